"""SimpleTuner's config.json and its companion files read as our recipe: the walkthrough's files
exactly as its readers have them (tests/data/simpletuner/config/: config.json, dataset.behitek.json,
user_prompt_library.json as printed there, and lycoris_config.json as SimpleTuner's example the
walkthrough copies), every key accounted for, missing files named by their key, and the imported
recipe trained on the tiny FLUX."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainer import cli
from trainer.cli import train as cli_train
from trainer.families.flux1.layers import FluxDims
from trainer.outputs import export
from trainer.recipe import build, formats, text
from trainer.recipe.importing import leaves
from trainer.recipe.schema import value_of

SEED = Path(__file__).resolve().parent / "data" / "simpletuner" / "config"
COMPANIONS = ("dataset.behitek.json", "lycoris_config.json", "user_prompt_library.json")
ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
NO_INT8 = [] if importlib.util.find_spec("torchao") else ["--base_model_precision"]


@pytest.fixture(scope="module")
def seed():
    return formats.load(SEED / "config.json")


def write(folder: Path, name: str, data) -> Path:
    (folder / name).write_text(json.dumps(data))
    return folder / name


def load(tmp_path: Path, flags: dict, backends: list | None = None):
    if backends is not None:
        flags = {"--data_backend_config": "multidatabackend.json", **flags}
        write(tmp_path, "multidatabackend.json", backends)
    return formats.load(write(tmp_path, "config.json", {"--model_type": "lora", "--model_family": "flux", **flags}))


def reasons(imported) -> dict[str, str]:
    """The unsupported keys and why; none of them also honoured."""
    why = {u.key: u.why for u in imported.unsupported}
    assert not set(why) & set(imported.honoured)
    return why


def test_the_walkthrough_config_sets_our_keys_one_by_one(seed):
    prompts = json.loads((SEED / "user_prompt_library.json").read_text())
    first = json.loads((SEED / "config.json").read_text())["--validation_prompt"]
    expected = {
        "dataset.folders": ["/path/to/datasets/behitek-lora"], "dataset.trigger": "behitek", "dataset.captions": "txt",
        "dataset.caption_dropout": 0.1, "dataset.repeats": 1001, "dataset.resolution": [1024, 512],
        "dataset.bucketing": False, "dataset.crop": "center",
        "layers.layer_types": ATTENTION + FEED_FORWARD,  # apply_preset: Attention, FeedForward
        "layers.variant": "lokr", "layers.rank": 10000, "layers.alpha": 1.0, "layers.lokr_factor": 16,  # LyCORIS's
        "layers.lokr_full_rank": False,  # linear_dim 10000: w2 trains whole (rank ≥ half of it), as LyCORIS does
        "train.steps": 10000, "train.learning_rate": 1e-4, "train.batch_size": 1, "train.seed": 42,
        "train.optimizer": "adamw", "train.weight_decay": 0.01, "train.optimizer_args": {"eps": 1e-6},
        "train.lr_schedule": "polynomial", "train.lr_power": 0.8, "train.warmup_steps": 100,
        "train.max_grad_norm": 1.0, "train.memory.checkpointing": "blocks",
        "save.output": "../output/behitek-lycoris-v0.1", "save.name": "simpletuner-lora", "save.every": 1000,
        "save.keep_last": 5, "validation.prompts": [first, *prompts.values()], "validation.every": 1000,
        "validation.seed": 42, "validation.steps": 20, "validation.guidance": 3.0, "validation.size": 1024,
        "validation.before_training": True,
    }
    assert seed.format == "simpletuner"
    assert {k: value_of(seed.recipe, k) for k in expected} == expected


def test_every_key_of_the_four_files_is_honoured_or_unsupported_by_name(seed):
    whole = json.loads((SEED / "config.json").read_text())
    whole.update({name: json.loads((SEED / name).read_text()) for name in COMPANIONS})
    unsupported = reasons(seed)
    assert set(seed.honoured) | set(unsupported) == set(leaves(whole))
    assert not set(seed.honoured) & set(unsupported)
    assert set(unsupported) == {
        "dataset.behitek.json[1].minimum_image_size", "--report_to", "--tracker_project_name",
        *NO_INT8}  # int8-quanto: base_quantization int8, which needs torchao
    assert {"lycoris_config.json.algo", "lycoris_config.json.factor",
            "lycoris_config.json.apply_preset.module_algo_map.Attention.factor",
            "lycoris_config.json.apply_preset.module_algo_map.FeedForward.factor"} <= set(seed.honoured)
    assert "1024" in unsupported["dataset.behitek.json[1].minimum_image_size"]  # one minimum for all backends
    assert seed.recipe.dataset.minimum_image_size == 1024
    assert "loss.png" in unsupported["--report_to"]
    notes = "\n".join(seed.notes)
    assert "dataset.behitek.json[0].instance_data_dir: '/path/to/datasets/behitek-lora' does not exist" in notes
    if not NO_INT8:
        assert seed.recipe.train.memory.base_quantization == "int8" and "int8-quanto" in notes
    assert "load black-forest-labs/FLUX.1-dev in ComfyUI" in notes


def test_missing_companion_files_are_notes_naming_their_key_and_path(tmp_path):
    imported = load(tmp_path, {"--data_backend_config": "config/nowhere.json", "--lora_type": "lycoris",
                               "--lycoris_config": "lycoris.json", "--user_prompt_library": "prompts.json",
                               "--lora_rank": 8, "--resolution": 768})
    notes = "\n".join(imported.notes)
    for key, value in [("--data_backend_config", "config/nowhere.json"), ("--lycoris_config", "lycoris.json"),
                       ("--user_prompt_library", "prompts.json")]:
        assert f"{key}: {value!r} does not exist here (looked in {tmp_path} and {tmp_path.parent})" in notes
    assert "dataset.folders is empty" in notes
    assert imported.unsupported == []
    assert imported.recipe.layers.rank == 8 and imported.recipe.dataset.resolution == [768]  # config.json's flags


def test_a_data_backend_file_alone_is_read_as_the_dataset(tmp_path):
    (tmp_path / "photos").mkdir()
    backends = [
        {"id": "subject", "type": "local", "instance_data_dir": "photos", "crop": True, "crop_style": "random",
         "crop_aspect": "preserve", "resolution": 1.05, "resolution_type": "area", "caption_strategy": "filename",
         "instance_prompt": "ohwx", "prepend_instance_prompt": True, "repeats": 4, "hash_filenames": True},
        {"id": "reg", "type": "local", "instance_data_dir": "/data/men", "is_regularisation_data": True, "crop": True,
         "crop_style": "center", "resolution": 512, "repeats": 0},
        {"id": "cloud", "type": "aws", "aws_bucket_name": "b", "instance_data_dir": "x"},
    ]
    imported = formats.load(write(tmp_path, "multidatabackend.json", backends))
    d = imported.recipe.dataset
    assert (d.folders, d.regularisation, d.resolution) == (["photos"], ["/data/men"], [1024, 512])  # 1.05 MP ≈ 1024²
    assert (d.captions, d.trigger, d.repeats, d.bucketing, d.crop) == ("filename", "ohwx", 5, True, "random")
    why = reasons(imported)
    assert set(why) == {f"multidatabackend.json[{k}" for k in ("1].crop_style", "1].crop", "2]")}
    assert "gives dataset.crop 'center', multidatabackend.json[0].crop_style gives 'random'" in \
        why["multidatabackend.json[1].crop_style"]
    assert "dataset.bucketing False" in why["multidatabackend.json[1].crop"]  # SimpleTuner's crop_aspect: square
    assert "type aws" in why["multidatabackend.json[2]"]
    assert any("megapixels" in n for n in imported.notes)


@pytest.mark.parametrize("target, double, single", [
    ("all", 19 * 8, 38 * 3), ("mmdit", 19 * 4, 38 * 3), ("context", 19 * 4, 0), ("all+ffs", 19 * 12, 38 * 5),
    ("ai-toolkit", 19 * 14, 38 * 6), ("tiny", 0, 2), ("nano", 0, 1), (None, 19 * 8, 38 * 3)])
def test_flux_lora_target_trains_simpletuners_layers(tmp_path, target, double, single):
    flags = {"--lora_type": "standard", "--lora_rank": 4, **({"--flux_lora_target": target} if target else {})}
    imported = load(tmp_path, flags)  # no target: SimpleTuner's default, all
    assert imported.unsupported == []
    targets = build.layer_spec(imported.recipe, FluxDims()).targets(FluxDims())
    assert sum(t.bfl_module.startswith("double_blocks") for t in targets) == double
    assert sum(t.bfl_module.startswith("single_blocks") for t in targets) == single
    assert {t.rank for t in targets} == {4}
    if target == "tiny":
        assert {t.bfl_module for t in targets} == {"single_blocks.7.linear2", "single_blocks.20.linear2"}


def test_optimizers_schedules_and_sigma_sampling_map_to_ours(tmp_path):
    imported = load(tmp_path, {"--optimizer": "optimi-lion", "--learning_rate": "3e-5", "--lr_scheduler": "cosine",
                               "--flow_schedule_shift": 3, "--use_ema": True, "--num_train_epochs": 5,
                               "--optimizer_config": "weight_decay=0.001,kahan_sum=true"})
    t = imported.recipe.train
    assert (t.optimizer, t.weight_decay, t.lr_schedule, t.ema_decay) == ("lion", 0.001, "cosine", 0.995)
    assert (t.timesteps.mode, t.timesteps.shift) == ("logit_normal", 3.0)
    why = reasons(imported)
    assert set(why) == {"--optimizer_config.kahan_sum", "--num_train_epochs"}
    assert "set train.steps" in why["--num_train_epochs"]
    auto = load(tmp_path, {"--optimizer": "adamw_schedulefree", "--lr_scheduler": "polynomial",
                           "--flow_schedule_auto_shift": True, "--optimizer_config": "eps=1e-7"})
    t = auto.recipe.train
    assert (t.optimizer, t.lr_schedule, t.timesteps.mode, t.optimizer_args) == \
        ("adamw_schedulefree", "constant", "flux_shift", {"eps": 1e-7})
    assert "soap" in reasons(load(tmp_path, {"--optimizer": "soap"}))["--optimizer"]


def test_lycoris_sizes_the_network_as_lora_and_as_lokr(tmp_path):
    write(tmp_path, "lycoris.json", {"algo": "lora", "linear_dim": 8, "linear_alpha": 4, "multiplier": 1.0})
    lora = load(tmp_path, {"--lora_type": "lycoris", "--lycoris_config": "lycoris.json", "--lora_rank": 64})
    assert (lora.recipe.layers.rank, lora.recipe.layers.alpha) == (8, 4.0)  # linear_dim, not --lora_rank
    assert lora.unsupported == [] and len(lora.recipe.layers.layer_types) == 17  # every Linear of the blocks
    example = {"algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_alpha": 1, "factor": 16}
    write(tmp_path, "lycoris.json", example)  # SimpleTuner's lycoris_config.json.example today (no preset)
    lokr = load(tmp_path, {"--lora_type": "lycoris", "--lycoris_config": "lycoris.json"})
    layers = lokr.recipe.layers
    assert lokr.unsupported == [] and (layers.variant, layers.lokr_full_rank, layers.lokr_factor) == ("lokr", True, 16)


@pytest.fixture
def photos(tmp_path, tiny_flux, monkeypatch):
    """Three generated photos with captions; the tiny model built once for all tests."""
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    folder = tmp_path / "photos"
    folder.mkdir()
    for n, colour in enumerate([(200, 40, 40), (40, 160, 90), (60, 60, 210)]):
        Image.new("RGB", (80, 64), colour).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(f"behitek a man in a {['red', 'green', 'blue'][n]} room")
    return folder


def test_the_walkthrough_config_trains_once_exported_as_our_recipe(tmp_path, photos):
    shutil.copytree(SEED, tmp_path / "config")
    config = tmp_path / "config" / "config.json"
    assert cli.main(["train", "--config", str(config), "--model", "tiny"]) == 1  # its /path/to/datasets: refused
    recipe = tmp_path / "config" / "behitek.yaml"
    assert cli.main(["config", str(config), "--write", str(recipe)]) == 0
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--set", "steps=2", "--set",
                     "warmup_steps=0", "--set", "dataset.folders=[../photos]", "--set", "resolution=64",
                     "--set", "dataset.minimum_image_size=0",
                     "--set", "validation.prompts=[]"]) == 0
    lora = tmp_path / "output" / "behitek-lycoris-v0.1" / "simpletuner-lora_001.safetensors"
    meta = json.loads(export.read_metadata(lora)["dreambooth.recipe"])
    assert meta["train"]["optimizer_args"] == {"eps": 1e-6} and meta["train"]["steps"] == 2
    assert meta["layers"]["layer_types"] == ATTENTION + FEED_FORWARD


def test_a_config_with_nothing_unsupported_trains_directly(tmp_path, photos):
    write(tmp_path, "multidatabackend.json", [{"id": "me", "type": "local", "instance_data_dir": "photos",
                                               "caption_strategy": "textfile", "instance_prompt": "behitek",
                                               "resolution": 64, "crop": True, "crop_aspect": "square"}])
    clean = write(tmp_path, "config.json", {
        "--model_type": "lora", "--model_family": "flux", "--data_backend_config": "multidatabackend.json",
        "--max_train_steps": 2, "--learning_rate": 2e-3, "--lora_rank": 4, "--flux_lora_target": "context",
        "--optimizer": "adamw_bf16", "--output_dir": "out", "--gradient_checkpointing": False, "--seed": 0})
    assert formats.load(clean).unsupported == []
    assert cli.main(["train", "--config", str(clean), "--model", "tiny"]) == 0
    sd = export.load(tmp_path / "out" / "flux_lora_001.safetensors")
    assert sd and all("double_blocks" in k and "txt_attn" in k for k in sd)  # --flux_lora_target context


def test_lycoris_per_module_factors_become_layer_groups_with_their_own(seed):
    """The walkthrough's module_algo_map: FeedForward's factor 8, Attention's 16 (the file's own):
    groups of their own, each LoKr target shaped by its group's factor."""
    groups = {(g.blocks, tuple(g.layer_types)): (g.variant, g.lokr_factor, g.rank, g.alpha)
              for g in seed.recipe.layers.groups}
    single_attention = tuple(t for t in ATTENTION if t in ("attn.to_q", "attn.to_k", "attn.to_v"))
    assert groups == {("transformer_blocks", tuple(ATTENTION)): ("lokr", 16, 10000, 1.0),
                      ("transformer_blocks", tuple(FEED_FORWARD)): ("lokr", 8, 10000, 1.0),
                      ("single_transformer_blocks", single_attention): ("lokr", 16, 10000, 1.0)}
    targets = {t.name: t for t in build.layer_spec(seed.recipe, FluxDims()).targets(FluxDims())}
    assert targets["transformer_blocks.3.ff.net.2"].lokr_factor == 8
    assert targets["transformer_blocks.3.attn.to_q"].lokr_factor == 16
    assert targets["single_transformer_blocks.37.attn.to_v"].lokr_factor == 16
    back = formats.loads(text.to_yaml(seed.recipe), SEED / "back.yaml")  # our format keeps them
    assert back.unsupported == [] and back.recipe.layers.groups == seed.recipe.layers.groups


def test_lycoris_name_algo_map_sizes_blocks_of_their_own(tmp_path):
    write(tmp_path, "lycoris.json", {
        "algo": "lora", "linear_dim": 16, "linear_alpha": 8,
        "apply_preset": {"target_module": ["Attention"],
                         "module_algo_map": {"Attention": {"linear_dim": 8}},
                         "name_algo_map": {"single_transformer_blocks.3[0-7]*": {"algo": "lokr", "factor": 4,
                                                                                  "linear_dim": 2, "dropout": 0.1}}}})
    imported = load(tmp_path, {"--lora_type": "lycoris", "--lycoris_config": "lycoris.json"})
    assert [u.key for u in imported.unsupported] == [
        "lycoris.json.apply_preset.name_algo_map.single_transformer_blocks.3[0-7]*.dropout"]
    spec = build.layer_spec(imported.recipe, FluxDims())
    targets = {t.name: t for t in spec.targets(FluxDims())}
    assert (targets["transformer_blocks.0.attn.to_q"].variant, targets["transformer_blocks.0.attn.to_q"].rank) == \
        ("lora", 8)  # Attention's own linear_dim, the file's alpha
    assert targets["transformer_blocks.0.attn.to_q"].scale == 1.0
    assert {(t.variant, t.rank, t.lokr_factor) for n, t in targets.items()
            if n.startswith(tuple(f"single_transformer_blocks.{b}." for b in range(30, 38)))} == {("lokr", 2, 4)}
    assert {(t.variant, t.rank) for n, t in targets.items() if n.startswith("single_transformer_blocks.29.")} == \
        {("lora", 8)}
