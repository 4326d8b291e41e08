"""`train --model` on FLUX.1 files: the tiny FLUX written to disk in each layout a user has (BFL
single files in a ComfyUI models folder, bf16 and fp8, clip_l / t5xxl, ae.safetensors; a diffusers
folder), loaded back by the command line's real loading code, gives the in-memory model's loss; and
a missing or wrong file stops the run by name before anything is written."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from flux_files import write_diffusers_folder, write_models_dir, write_text_encoder, write_transformer_bfl
from safetensors.torch import save_file

from trainer import cli
from trainer.cli import models
from trainer.cli import train as cli_train
from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.families.flux1 import tiny
from trainer.loop.trainer import fixed_noise_loss
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
RECIPE = """\
dataset: {folders: photos, trigger: sks, resolution: 64, bucketing: false}
layers: {preset: attention, rank: 4}
train: {steps: 2, learning_rate: 3e-3, seed: 0, memory: {checkpointing: "off"}}
save: {every: 100, keep_last: 0, name: toy, output: runs}
"""


@pytest.fixture(scope="module")
def parts():
    """The tiny FLUX with CLIP heads 64 wide, as CLIP-L's (a clip_l file doesn't store its head count)."""
    return tiny.build(0, clip_heads=1)


@pytest.fixture(scope="module")
def on_disk(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_files")
    write_models_dir(parts, root / "models", torch.float32, "flux1-tiny-fp32.safetensors")
    (root / "models" / "unet").mkdir()  # the stock loader's other folder
    for name, dtype in (("flux1-tiny-bf16.safetensors", torch.bfloat16),
                        ("flux1-tiny-fp8_e4m3fn.safetensors", torch.float8_e4m3fn)):
        write_transformer_bfl(parts.transformer, root / "models" / "unet" / name, dtype)
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors"):  # fp32, for exact losses
        write_text_encoder(parts.clip if "clip" in name else parts.t5, root / "models" / "text_encoders" / name,
                           torch.float32)
    write_diffusers_folder(parts, root / "FLUX.1-tiny")
    return root


def args(model: str, **flags) -> argparse.Namespace:
    base = dict(model=model, models_dir=None, clip_l=None, t5=None, vae=None, tokenizers=None, loader="diffusers",
                dtype="fp32")
    return argparse.Namespace(**{**base, **flags})


def loss_of(model, seed: int = 0) -> float:
    """The fixed-noise loss of the quickstart's first two photos, encoded by `model`'s own encoders."""
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    dataset = datasets.from_folder(QUICKSTART, options)
    dataset = dataclasses.replace(dataset, items=dataset.items[:2])
    examples = encode_dataset(dataset, model, None, seed)[0]
    backend = model.backend()
    lora = LoraSet(LayerSpec.preset("attention", backend.dims, rank=4).targets(backend.dims), torch.float32, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in lora.transformer():  # a LoRA that changes the output, so the loss reads every layer it sits on
            w.up.copy_(torch.randn(w.up.shape, generator=generator) * 0.05)
    return fixed_noise_loss(backend, lora, examples)


def rounded(parts, dtype):
    """The in-memory set with its transformer's weights rounded through `dtype`, as a file of that dtype holds them."""
    copy = tiny.build(0, clip_heads=1)
    with torch.no_grad():
        for p in copy.transformer.parameters():
            p.copy_(p.to(dtype).float())
    return copy


@pytest.mark.parametrize("layout", ["fp32", "bf16", "fp8_e4m3fn", "diffusers folder"])
def test_each_layout_loads_back_with_the_in_memory_loss(parts, on_disk, layout):
    if layout == "diffusers folder":
        plan = models.plan(args(str(on_disk / "FLUX.1-tiny")))
        reference = parts
    else:
        plan = models.plan(args(f"flux1-tiny-{layout}.safetensors", models_dir=on_disk / "models"))
        reference = {"fp32": parts, "bf16": rounded(parts, torch.bfloat16),
                     "fp8_e4m3fn": rounded(parts, torch.float8_e4m3fn)}[layout]
        assert [plan.parts[p].path.parent.name for p in ("clip_l", "t5", "vae")] == ["text_encoders"] * 2 + ["vae"]
    loaded = models.load(plan)
    got, expected = loss_of(loaded), loss_of(reference)
    assert got == pytest.approx(expected, rel=1e-6)
    if layout == "fp8_e4m3fn":  # the file's rounding is real: fp8 weights give another loss than the full ones
        assert abs(got - loss_of(parts)) > 20 * abs(got - expected)


def test_cli_trains_on_files_from_a_models_folder_as_on_the_model_in_memory(parts, on_disk, tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    argv = ["train", "--config", str(tmp_path / "recipe.yaml")]
    assert cli.main([*argv, "--model", "flux1-tiny-fp32.safetensors", "--models-dir", str(on_disk / "models"),
                     "--loader", "diffusers", "--dtype", "fp32"]) == 0
    monkeypatch.setattr(cli_train, "tiny_model", lambda: parts)  # the same weights, in memory
    assert cli.main([*argv, "--model", "tiny"]) == 0
    files, memory = (json.loads((tmp_path / "runs" / f"toy_00{i}" / "summary.json").read_text()) for i in (1, 2))
    assert files["losses"] == pytest.approx(memory["losses"], rel=1e-5)
    assert files["fixed_noise_loss_after"] == pytest.approx(memory["fixed_noise_loss_after"], rel=1e-5)
    assert (tmp_path / "runs" / "toy_001.safetensors").is_file()


def test_wrong_or_missing_files_are_named_before_anything_is_written(on_disk, tmp_path, caplog):
    m = on_disk / "models"
    flux2 = tmp_path / "flux2-dev.safetensors"
    save_file({"img_in.weight": torch.zeros(8, 128), "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
               "double_stream_modulation_img.lin.weight": torch.zeros(48, 8)}, str(flux2))
    (tmp_path / "flux1-dev.gguf").write_bytes(b"GGUF")
    big_vocab = tmp_path / "clip_l_real_vocab.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(49408, 4)}, str(big_vocab))
    cases = [
        (["--model", str(m / "vae" / "ae.safetensors")], "this is FLUX.1's VAE; expected a FLUX.1 transformer"),
        (["--model", str(flux2), "--models-dir", str(m), "--family", "flux1"],
         "this is a FLUX.2 transformer; expected a FLUX.1 transformer"),
        (["--model", "flux1-tiny-fp32.safetensors", "--models-dir", str(m),
          "--vae", str(m / "text_encoders" / "clip_l.safetensors")],
         "this is a CLIP-L text encoder; expected FLUX.1's VAE"),
        (["--model", str(m / "diffusion_models" / "flux1-tiny-fp32.safetensors")], "--clip-l is needed"),
        (["--model", "flux1-tiny-fp32.safetensors", "--models-dir", str(m), "--t5", "t5xxl_fp8.safetensors"],
         "--t5 t5xxl_fp8.safetensors: not a file, nor in"),
        (["--model", str(tmp_path / "flux1-dev.gguf"), "--models-dir", str(m)], "a GGUF file"),
        (["--model", "flux1-tiny-fp32.safetensors", "--models-dir", str(m), "--clip-l", str(big_vocab),
          "--loader", "diffusers"], "need their tokenizers: give --tokenizers DIR"),
        (["--model", "tiny", "--vae", "ae.safetensors"], "--model tiny is the embedded tiny FLUX; --vae"),
        (["--model", str(tmp_path)], "a folder without transformer/config.json"),
    ]
    (tmp_path / "photos").mkdir()
    shutil.copy(QUICKSTART / "01.jpg", tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    for extra, message in cases:
        caplog.clear()
        assert cli.main(["train", "--config", str(tmp_path / "recipe.yaml"), *extra]) == 1, extra
        assert message in caplog.text, (extra, caplog.text)
        assert not (tmp_path / "runs").exists()


def test_t5_in_comfyuis_scaled_fp8_is_multiplied_out(parts, tmp_path):
    """t5xxl_fp8_e4m3fn_scaled.safetensors: fp8 weights with a `scale_weight` each; read as weight × scale."""
    from trainer.cli import diffusers_models, weights

    state, scaled = parts.t5.state_dict(), {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2 and ".block." in k:
            scale = v.abs().max() / 448  # fp8 e4m3's largest value
            scaled[k] = (v / scale).to(torch.float8_e4m3fn)
            scaled[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        elif k != "encoder.embed_tokens.weight":
            scaled[k] = v
    save_file(scaled, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    w = weights.inspect(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", "--t5", weights.T5)
    loaded = diffusers_models.t5(w, torch.float32)
    ids = tiny.ByteTokenizer()("a photo of sks toy", 64, bos=False)[None]
    with torch.no_grad():
        want, got = parts.t5(ids).last_hidden_state, loaded(ids).last_hidden_state
    error = ((got - want).norm() / want.norm()).item()
    assert error < 0.05, error  # fp8's rounding only; unscaled, the small weights would be lost
    block = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(loaded.state_dict()[block], scaled[block].float() * scaled[block[:-7] + ".scale_weight"])
