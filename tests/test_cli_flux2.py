"""FLUX.2 on the command line: `--model tiny --family flux2` trains the embedded tiny FLUX.2, and the
same model written to disk as a ComfyUI user has FLUX.2 [klein] (BFL transformer, qwen_3_4b, flux2-vae)
loads back through the command line's loading code with the in-memory loss, trains to the same
losses, and a wrong or missing file is named before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flux2_files import TRANSFORMER_NAME, write_models_dir
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli_models import QUICKSTART, RECIPE, args, loss_of

from trainer import cli
from trainer.cli import models
from trainer.cli import train as cli_train
from trainer.families.flux2 import tiny


@pytest.fixture(scope="module")
def parts():
    return tiny.build(0)


@pytest.fixture(scope="module")
def on_disk(parts, tmp_path_factory):
    return write_models_dir(parts, tmp_path_factory.mktemp("flux2_files") / "models")


def test_files_load_back_with_the_in_memory_loss(parts, on_disk):
    plan = models.plan(args(TRANSFORMER_NAME, models_dir=on_disk, text_encoder=None, family="auto"))
    assert plan.family == "flux2" and plan.loader == "diffusers"
    assert {r: w.path.name for r, w in plan.parts.items() if r != "transformer"} == {
        "text_encoder": "qwen_3_4b.safetensors", "vae": "flux2-vae.safetensors"}
    loaded = models.load(plan)
    assert loaded.backend().family.name == "flux2"
    assert loss_of(loaded) == pytest.approx(loss_of(parts), rel=1e-6)


def test_cli_trains_tiny_flux2_and_its_files_alike(parts, on_disk, tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    argv = ["train", "--config", str(tmp_path / "recipe.yaml")]
    assert cli.main([*argv, "--model", TRANSFORMER_NAME, "--models-dir", str(on_disk), "--dtype", "fp32"]) == 0
    monkeypatch.setattr(cli_train, "tiny_flux2_model", lambda: parts)
    assert cli.main([*argv, "--model", "tiny", "--family", "flux2"]) == 0
    files, memory = (json.loads((tmp_path / "runs" / f"toy_00{i}" / "summary.json").read_text()) for i in (1, 2))
    assert files["losses"] == pytest.approx(memory["losses"], rel=1e-5)
    with safe_open(str(tmp_path / "runs" / "toy_002.safetensors"), "pt") as f:
        assert f.metadata()["dreambooth.family"] == "flux2"


def test_wrong_or_missing_flux2_files_are_named_before_anything_is_written(on_disk, tmp_path, caplog):
    flux1_vae = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_out.weight": torch.zeros(32, 4, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)},
              str(flux1_vae))
    model = ["--model", str(on_disk / "diffusion_models" / TRANSFORMER_NAME)]
    te = ["--text-encoder", str(on_disk / "text_encoders" / "qwen_3_4b.safetensors")]
    cases = [
        ([*model, "--family", "flux1"], "this is a FLUX.2 transformer; expected a FLUX.1 transformer"),
        ([*model, *te, "--clip-l", "clip_l.safetensors"], "is FLUX.2, which does not read --clip-l"),
        ([*model, "--vae", str(flux1_vae)], "--text-encoder is needed"),
        ([*model, *te, "--vae", str(flux1_vae)], "this is FLUX.1's VAE; expected FLUX.2's VAE"),
        ([*model, "--vae", str(on_disk / "vae" / "flux2-vae.safetensors"),
          "--text-encoder", str(on_disk / "vae" / "flux2-vae.safetensors")], "expected FLUX.2 [klein]'s Qwen3"),
        ([*model, "--models-dir", str(on_disk), "--loader", "comfyui"], "FLUX.2 files load through diffusers"),
        (["--model", "tiny", "--family", "flux2", *te], "--model tiny is the embedded tiny FLUX; --text-encoder"),
    ]
    (tmp_path / "photos").mkdir()
    shutil.copy(QUICKSTART / "01.jpg", tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    for extra, message in cases:
        caplog.clear()
        assert cli.main(["train", "--config", str(tmp_path / "recipe.yaml"), *extra]) == 1, extra
        assert message in caplog.text, (extra, caplog.text)
        assert not (tmp_path / "runs").exists()
