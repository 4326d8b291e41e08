"""ai-toolkit job YAMLs read as our recipe (every key honoured, noted or unsupported by name), trained
on the tiny FLUX, and recipes written as ai-toolkit jobs that read back to the same settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from trainer import cli
from trainer.cli import train as cli_train
from trainer.families.flux1.layers import FluxDims
from trainer.recipe import ai_toolkit, build, formats
from trainer.recipe.ai_toolkit import layers
from trainer.recipe.importing import leaves
from trainer.recipe.schema import Recipe, all_keys, value_of

# The job YAML of a user's ai-toolkit write-up (Dutch), exactly as printed there: its `config:` is
# empty and name/process sit at the top level (ai-toolkit itself refuses it so).
SEED = Path(__file__).parent / "data" / "ai_toolkit_kuthumi_hq_1024.yaml"
# the seed's optimizer adamw8bit needs bitsandbytes: where it doesn't import, that key is unsupported, by name
NO_BNB = [] if importlib.util.find_spec("bitsandbytes") else ["process.train.optimizer"]


def seed_text(**replace: str) -> str:
    text = SEED.read_text(encoding="utf-8")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_the_seed_job_reads_key_by_key_with_nothing_unsupported():
    imported = formats.load(SEED)
    r = imported.recipe
    assert imported.format == "ai-toolkit" and [u.key for u in imported.unsupported] == NO_BNB
    assert (r.save.name, r.save.every, r.save.keep_last, r.save.dtype, r.save.output) == (
        "Kuthumi_HQ_1024", 250, 8, "fp16", "")  # training_folder is a Windows path: not taken
    d = r.dataset
    assert d.folders == ["D:\\ai-toolkit\\datasets\\Kuthumi"]
    assert d.regularisation == ["D:\\ai-toolkit\\datasets\\generic_person_reg"]
    assert (d.trigger, d.class_word, d.caption_dropout, d.resolution) == ("kvthvmi_", "person", 0.22, [1024])
    assert d.default_caption == "kvthvmi_ person, middle-aged Indian guru, dark skin"
    assert (r.layers.rank, r.layers.alpha) == (64, 0.0)  # ai-toolkit's FLUX LoRAs: alpha = rank, whatever linear_alpha
    assert r.layers.layer_types == layers.all_types()  # every linear of the blocks, modulation layers too
    assert len(build.layer_spec(r, FluxDims()).targets(FluxDims())) == len(layers.every_layer()) == 19 * 14 + 38 * 6
    t = r.train
    assert (t.steps, t.learning_rate, t.batch_size, t.gradient_accumulation_steps) == (7000, 5e-5, 1, 1)
    assert (t.optimizer, t.weight_decay, t.optimizer_args) == ("adamw" if NO_BNB else "adamw8bit", 0.01, {"eps": 1e-6})
    assert (t.timesteps.mode, t.ema_decay, t.memory.checkpointing, t.loss.kind) == ("sigmoid", 0.999, "blocks", "mse")
    v = r.validation
    assert (v.every, v.seed, v.steps, v.guidance, v.size, v.before_training) == (250, 42, 36, 3.6, 1024, True)
    assert len(v.prompts) == 5 and v.prompts[0].startswith("Close-up portrait of kvthvmi_ person")
    told = set(imported.honoured) | set(NO_BNB)
    assert all(any(leaf == k or leaf.startswith(f"{k}.") for k in told)
               for leaf in leaves(yaml.safe_load(SEED.read_text())))
    notes = "\n".join(imported.notes)
    for needle in ("config: it is empty", "process.network.linear_alpha: ai-toolkit saves FLUX LoRAs in peft format",
                   "process.sample.walk_seed: ai-toolkit renders prompt i with seed + i",
                   "process.datasets[1].resolution: [512, 768, 1024] differs from the subject's ([1024])",
                   "load this model in ComfyUI (black-forest-labs/FLUX.1-Krea-dev)",
                   "process.training_folder: 'D:\\\\ai-toolkit\\\\output' is a Windows path",
                   "process.datasets[0].folder_path: 'D:\\\\ai-toolkit\\\\datasets\\\\Kuthumi' does not exist here "
                   "(a Windows path", "change process.datasets[1].folder_path."):
        assert needle in notes, needle


NESTED = """\
job: extension
config:
  name: lokr_test
  process:
    - type: sd_trainer
      training_folder: runs
      trigger_word: ohwx
      network:
        type: lokr
        linear: 16
        lokr_full_rank: true
        lokr_factor: 4
        network_kwargs:
          only_if_contains: ["transformer.single_transformer_blocks.7.proj_out",
                             "transformer.single_transformer_blocks.20.proj_out"]
      datasets:
        - folder_path: "~/no_such_aitk_photos"
          caption_ext: json
          caption_dropout_rate: 0.1
          flip_y: true
        - folder_path: /no/such/second
          caption_dropout_rate: 0.3
          network_weight: 0.5
      train:
        steps: 1000
        gradient_accumulation_steps: 4
        optimizer: prodigy
        lr: 1e-4
        lr_scheduler: linear
        timestep_type: lognorm_blend
        loss_type: wavelet
        content_or_style: content
        train_text_encoder: true
        text_encoder_lr: 5e-6
        diff_output_preservation: true
        diff_output_preservation_multiplier: 0.5
        diff_output_preservation_class: man
      sample:
        prompts: ["[trigger] smiling"]
        width: 1024
        height: 768
"""


def test_a_job_names_each_key_it_cant_use_and_the_setting_it_would_be(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "job.yaml").write_text(NESTED)
    imported = formats.load(tmp_path / "job.yaml")
    p = "config.process"
    unsupported = {u.key: u.why for u in imported.unsupported}
    would_be: dict[str, str] = {}  # every setting this job names exists now
    others = [f"{p}.datasets[0].flip_y", f"{p}.train.lr_scheduler", f"{p}.train.timestep_type",
              f"{p}.train.loss_type", f"{p}.train.content_or_style"]
    assert set(unsupported) == set(would_be) | set(others)
    assert f"{p}.datasets[0].caption_ext" in imported.honoured and imported.recipe.dataset.caption_ext == "json"
    assert (imported.recipe.train.dop_multiplier, imported.recipe.train.dop_class) == (0.5, "man")
    layers = imported.recipe.layers
    assert (layers.variant, layers.lokr_factor, layers.lokr_full_rank) == ("lokr", 4, True)
    assert imported.recipe.train.text_encoder_lr == 5e-6  # train_text_encoder with its own rate
    assert any(n.startswith(f"{p}.datasets[1].network_weight: 0.5 differs") for n in imported.notes)
    for key, ours in would_be.items():
        assert unsupported[key] == f"this pack has no setting for it yet (it would be {ours})", key
    assert "LinearLR" in unsupported[f"{p}.train.lr_scheduler"] and "wavelet" in unsupported[f"{p}.train.loss_type"]
    r = imported.recipe
    assert r.dataset.folders == ["~/no_such_aitk_photos", "/no/such/second"] and r.dataset.caption_dropout == 0.1
    assert (r.train.steps, r.train.gradient_accumulation_steps) == (250, 4)  # legacy accumulation: batches as steps
    assert (r.train.optimizer, r.train.learning_rate, r.train.weight_decay) == ("prodigy", 1.0, 0.0)
    assert (r.validation.prompts, r.validation.size, r.validation.guidance) == (["[trigger] smiling"], 1024, 7.0)
    assert (r.save.output, r.save.every, r.save.keep_last) == ("runs", 1000, 5)  # ai-toolkit's defaults
    assert r.train.timesteps.mode == "flux_shift"  # timestep_type can't be used: ours stays
    names = {t.name for t in build.layer_spec(r, FluxDims()).targets(FluxDims())}
    assert names == {"single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"}
    notes = "\n".join(imported.notes)
    assert f"{p}.datasets[1].caption_dropout_rate: 0.3 differs from {p}.datasets[0].caption_dropout_rate" in notes
    assert f"{p}.train.gradient_accumulation_steps: ai-toolkit counts each batch as a step" in notes
    assert f"{p}.sample.height: samples are square here" in notes
    assert "save.every 1000 (save_every); save.keep_last 5 (max_step_saves_to_keep)" in notes
    home = tmp_path / "no_such_aitk_photos"  # `~` is the home folder
    assert f"{p}.datasets[0].folder_path: '~/no_such_aitk_photos' does not exist here ({home})" in notes
    assert f"{p}.datasets[1].folder_path: '/no/such/second' does not exist here" in notes
    assert f"{p}.training_folder: 'runs' is relative" in notes


def test_keys_left_out_take_ai_toolkits_defaults():
    minimal = {"job": "extension", "config": {"name": "x", "process": [{"type": "sd_trainer", "train": {},
                                                                         "network": {"type": "lora"}}]}}
    imported = ai_toolkit.read(minimal, Path("job.yaml"))
    t, lay = imported.recipe.train, imported.recipe.layers
    assert (t.learning_rate, t.timesteps.mode, t.weight_decay) == (1e-6, "sigmoid", 0.01)
    assert t.optimizer_args == {"eps": 1e-6}
    assert (lay.rank, lay.layer_types, imported.recipe.dataset.trigger) == (4, layers.all_types(), "")
    assert imported.unsupported == [] and imported.honoured == ["job", "config.name", "config.process.type",
                                                           "config.process.train", "config.process.network.type"]
    assert any(n.startswith("Left out of the file, so ai-toolkit's defaults: ") and "train.learning_rate 1e-06 (lr)"
               in n for n in imported.notes)


def photos(folder: Path, n: int, seed: int, caption: str | None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        if caption:
            (folder / f"{i:02d}.txt").write_text(caption)


def test_the_seed_job_trains_on_the_tiny_model(tmp_path, tiny_flux, monkeypatch):
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    monkeypatch.setenv("HOME", str(tmp_path))
    photos(tmp_path / "photos", 2, 0, "kvthvmi_ person, a test photo")
    photos(tmp_path / "reg", 1, 1, None)  # uncaptioned: trains on the reg set's default_caption, 'person'
    job = tmp_path / "job.yaml"
    job.write_text(seed_text(**{"D:\\ai-toolkit\\datasets\\Kuthumi": "~/photos",
                                "D:\\ai-toolkit\\datasets\\generic_person_reg": str(tmp_path / "reg"),
                                "D:\\ai-toolkit\\output": str(tmp_path / "runs")}))
    assert [u.key for u in formats.load(job).unsupported] == NO_BNB
    assert cli.main(["train", "--config", str(job), "--model", "tiny", "--set", "steps=2", "--set", "rank=4",
                     "--set", "resolution=64", "--set", "optimizer=adamw", "--set", "validation.prompts=[]"]) == 0
    summary = json.loads((tmp_path / "runs" / "Kuthumi_HQ_1024_001" / "summary.json").read_text())
    assert summary["steps"] == 2 and Path(summary["lora"]).is_file()


def round_trip(recipe: Recipe) -> tuple[Recipe, ai_toolkit.Export, list]:
    result = ai_toolkit.export(recipe)
    imported = ai_toolkit.read(yaml.safe_load(ai_toolkit.write(recipe)), Path("job.yaml"))
    return imported.recipe, result, imported.unsupported


def differing(a: Recipe, b: Recipe) -> set[str]:
    return {k.path for k in all_keys() if "[]" not in k.path and value_of(a, k.path) != value_of(b, k.path)}


def test_a_recipe_ai_toolkit_can_express_reads_back_key_by_key_the_same():
    recipe = Recipe().with_settings([
        "dataset.folders=[photos, /data/more]", "dataset.regularisation=[reg]", "dataset.class_word=person",
        "trigger=ohwx", "dataset.default_caption=a photo of ohwx", "caption_dropout=0.15", "dataset.repeats=3",
        "resolution=512,1024", "dataset.bucketing=false", "dataset.crop=random", "dataset.flip=true",
        "dataset.regularisation_weight=0.5", "layers.blocks=single_transformer_blocks", "layers.start=10",
        "layers.layer_types=[attn.to_q, proj_out]", "rank=8", "steps=300", "learning_rate=2e-4", "batch_size=2",
        "weight_decay=0.02", "train.max_grad_norm=0.5", "train.timesteps.mode=weighted", "lr_schedule=cosine",
        "ema_decay=0.99", "optimizer=adafactor", "gradient_accumulation_steps=2", "loss=l1",
        "train.memory.checkpointing=off", "save.output=runs", "name=ohwx_lora", "save_every=50", "keep_last=3",
        "save.dtype=bf16", 'validation.prompts=["[trigger] at the beach", "a dog"]',
        "validation.every=50", "validation.seed=7", "validation.steps=12", "validation.guidance=4.0",
        "validation.size=768", "validation.before_training=false"])
    back, result, unsupported = round_trip(recipe)
    assert result.lost == {} and unsupported == []
    assert differing(recipe, back) == set() and back == recipe


def test_what_ai_toolkit_cant_express_is_named_in_the_comment_and_the_rest_reads_back():
    recipe = Recipe().with_settings([
        "dataset.folders=[photos]", "dataset.captions=metadata", "train.seed=3", "lr_schedule=polynomial",
        "warmup_steps=10", "train.memory.swap_blocks=4", "train.timesteps.mode=cosmap", "alpha=8",
        "layers.groups=[{blocks: transformer_blocks, layer_types: [attention], rank: 8},"
        " {blocks: single_transformer_blocks, start: 30, layer_types: [proj_out], rank: 4}]"])
    back, result, unsupported = round_trip(recipe)
    lost = {"save.output", "validation.size", "train.optimizer_args", "dataset.captions", "train.seed",
            "train.lr_schedule", "train.warmup_steps", "train.memory.swap_blocks", "train.timesteps.mode",
            "layers.groups"}
    assert set(result.lost) == lost and unsupported == []
    assert differing(recipe, back) - {"layers.rank", "layers.alpha"} <= lost  # not used with groups
    written = ai_toolkit.write(recipe)
    comment = written.split("\njob:")[0]
    assert all(f"#   {key}: " in comment for key in lost)
    names = {t.name for t in build.layer_spec(back, FluxDims()).targets(FluxDims())}
    assert names == {t.name for t in build.layer_spec(recipe, FluxDims()).targets(FluxDims())}  # the same layers


def test_the_default_layers_are_written_as_a_filter_and_read_back_as_the_preset():
    network = ai_toolkit.export(Recipe()).job["config"]["process"][0]["network"]
    assert network["network_kwargs"] == {"ignore_if_contains": ["norm1.linear", "norm1_context.linear", "norm.linear"]}
    back, _, _ = round_trip(Recipe())
    assert back.layers == Recipe().layers


def test_config_writes_an_ai_toolkit_job_that_reads_back(tmp_path, capsys, caplog):
    out = tmp_path / "job.yaml"
    assert cli.main(["config", str(SEED), "--write", str(out), "--to", "ai-toolkit"]) == 0
    assert "as an ai-toolkit job" in capsys.readouterr().out
    assert out.read_text().startswith("# ai-toolkit job written by comfyui-flux-dreambooth")
    written, seed = formats.load(out), formats.load(SEED)
    assert written.format == "ai-toolkit" and written.unsupported == []
    assert differing(written.recipe, seed.recipe) == set(ai_toolkit.export(seed.recipe).lost) == {"save.output"}
    assert cli.main(["config", str(SEED), "--to", "ai-toolkit"]) == 2
    assert "give --write OUT.yaml too" in caplog.text


@pytest.mark.parametrize("only, ignore", [(None, ["ff.net", "proj_mlp"]), (["transformer.transformer_blocks.3."], None),
                                          (["attn.to_q", "single_transformer_blocks.1.proj_out"], ["blocks.0."])])
def test_layer_filters_become_our_layers_and_back_exactly(only, ignore):
    chosen = layers.selected(only, ignore)
    recipe = Recipe.from_dict({"layers": {k.split(".", 1)[1]: v for k, v in layers.to_settings(chosen, 4).items()}})
    trained = {(t.name.split(".")[0], int(t.name.split(".")[1]), t.name.split(".", 2)[2])
               for t in build.layer_spec(recipe, FluxDims()).targets(FluxDims())}
    assert trained == chosen and 0 < len(chosen) < len(layers.every_layer())
    filters = layers.to_filters(chosen)
    assert layers.selected(filters.get("only_if_contains"), filters.get("ignore_if_contains")) == chosen


def test_a_setting_the_writer_does_not_know_is_named_not_dropped():
    recipe = Recipe().with_settings(["dataset.folders=[photos]", "dataset.maximum_image_size=1536",
                                     "dataset.target_downsample_size=1024"])
    lost = ai_toolkit.export(recipe).lost
    assert lost["dataset.maximum_image_size"] == "1536: ai-toolkit's job has no such setting"
    assert "dataset.target_downsample_size" in lost and "dataset.minimum_image_size" not in lost  # at its default


def test_differential_output_preservation_reads_back_from_the_written_job():
    recipe = Recipe().with_settings(["dataset.folders=[photos]", "dataset.class_word=person",
                                     "train.dop_multiplier=0.75"])
    result = ai_toolkit.export(recipe)
    train = result.job["config"]["process"][0]["train"]
    assert (train["diff_output_preservation"], train["diff_output_preservation_class"]) == (True, "person")
    back, _, unsupported = round_trip(recipe)
    assert back.train.dop_multiplier == 0.75 and not [k for k in result.lost if k.startswith("train.dop")]


def test_the_text_encoder_phase_is_written_with_what_ai_toolkit_cannot_say():
    recipe = Recipe().with_settings(["dataset.folders=[photos]", "text_encoder_lr=5e-6", "text_encoder_start=0.85"])
    result = ai_toolkit.export(recipe)
    train = result.job["config"]["process"][0]["train"]
    assert (train["train_text_encoder"], train["text_encoder_lr"]) == (True, 5e-6)
    assert set(k for k in result.lost if k.startswith("train.text_encoder")) == {"train.text_encoder_start"}


def test_network_weight_of_the_subject_and_of_a_regularisation_set(tmp_path):
    job = {"job": "extension", "config": {"name": "x", "process": [{"type": "sd_trainer", "datasets": [
        {"folder_path": "me", "network_weight": 0.9}, {"folder_path": "reg", "is_reg": True, "network_weight": -1}]}]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    imported = formats.load(tmp_path / "job.yaml")
    d = imported.recipe.dataset
    assert (d.network_weight, d.regularisation_network_weight) == (0.9, -1.0)
    assert {"config.process.datasets[0].network_weight", "config.process.datasets[1].network_weight"} <= set(
        imported.honoured)


def test_network_weights_read_back_from_the_written_job():
    recipe = Recipe().with_settings(["dataset.folders=[me]", "dataset.regularisation=[reg]", "dataset.class_word=man",
                                     "dataset.network_weight=0.9", "dataset.regularisation_network_weight=-1"])
    back, result, _ = round_trip(recipe)
    assert (back.dataset.network_weight, back.dataset.regularisation_network_weight) == (0.9, -1.0)
    assert not [k for k in result.lost if "network_weight" in k]


def test_a_lokr_reads_back_from_the_written_job_and_per_group_factors_are_named():
    recipe = Recipe().with_settings(["dataset.folders=[photos]", "layers.variant=lokr", "layers.lokr_factor=8",
                                     "rank=16"])
    network = ai_toolkit.export(recipe).job["config"]["process"][0]["network"]
    assert (network["type"], network["lokr_factor"], network["lokr_full_rank"]) == ("lokr", 8, False)
    back, result, unsupported = round_trip(recipe)
    assert unsupported == [] and not {"layers.variant", "layers.lokr_factor", "layers.rank"} & set(result.lost)
    assert (back.layers.variant, back.layers.lokr_factor, back.layers.rank) == ("lokr", 8, 16)
    grouped = recipe.with_settings([
        "layers.groups=[{blocks: transformer_blocks, layer_types: [attention], rank: 16},"
        " {blocks: single_transformer_blocks, layer_types: [proj_out], rank: 16, lokr_factor: 4}]"])
    lost = ai_toolkit.export(grouped).lost["layers.groups"]
    assert "lokr (lokr_factor 4" in lost and "lokr (lokr_factor 8" in lost and "one lokr_factor" in lost
