"""mflux train configs read as recipes: the three templates of mflux's DreamBooth guide exactly as it
prints them (tests/data/mflux_*.json), key by key; what can't be used, by key; paths as mflux reads
them; and one of them trained for a few steps on the tiny FLUX."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainer import cli
from trainer.cli import train as cli_train
from trainer.recipe import build, formats

DATA = Path(__file__).resolve().parent / "data"
TEMPLATES = {  # file -> (steps, batch, lr, guidance, sampling steps, every, prompt, quantize, output, groups)
    "mflux_pets.json": (100 * 5, 1, 1e-4, 3.0, 20, 20, "photo of sks dog", 4, "my_pet_model", [
        ("single_transformer_blocks", 0, 38, ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"], 4)]),
    "mflux_people.json": (150 * 5, 1, 5e-5, 4.0, 25, 25, "portrait of sks person", 4, "my_person_model", [
        ("single_transformer_blocks", 10, 38, ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"], 8)]),
    "mflux_art_style.json": (80 * 2, 2, 2e-4, 3.5, 20, 10, "artwork in sks style", 8, "my_style_model", [  # 3 photos
        ("transformer_blocks", 5, 15, ["attn.to_q", "attn.to_k", "attn.to_v"], 16),
        ("single_transformer_blocks", 20, 38, ["proj_out", "proj_mlp"], 8)]),
}
TOP_KEYS = ["model", "quantize", "seed", "steps", "guidance", "width", "height", "examples.path", "examples.images",
            "training_loop.batch_size", "training_loop.num_epochs", "optimizer.learning_rate", "optimizer.name",
            "save.checkpoint_frequency", "save.output_path", "instrumentation.plot_frequency",
            "instrumentation.generate_image_frequency", "instrumentation.validation_prompt"]
# mflux's quantize becomes base_quantization int8, which needs torchao: without it, `quantize` is unsupported
NO_INT8 = [] if importlib.util.find_spec("torchao") else ["quantize"]


def photos(folder: Path, names, size=(80, 72)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (40 * i % 255, 90, 160)).save(folder / name)


def template(tmp_path: Path, name: str, with_photos: bool = True) -> Path:
    path = tmp_path / name
    shutil.copy(DATA / name, path)
    if with_photos:
        photos(tmp_path / "images", [e["image"] for e in json.loads(path.read_text())["examples"]["images"]])
    return path


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_of_the_guide_is_read_key_by_key(tmp_path, name):
    steps, batch, lr, guidance, sampling, every, prompt, bits, output, groups = TEMPLATES[name]
    imported = formats.load(template(tmp_path, name))
    r = imported.recipe
    assert imported.format == "mflux" and [u.key for u in imported.unsupported] == NO_INT8
    lora_keys = [f"lora_layers.{g[0]}" for g in groups]
    assert sorted(imported.honoured) == sorted([k for k in TOP_KEYS if k not in NO_INT8] + lora_keys)
    assert r.train.memory.base_quantization == ("none" if NO_INT8 else "int8")  # quantize 4/8: int8, noted
    assert r.dataset.folders == [name] and r.dataset.trigger == "" and r.dataset.resolution == [512]
    assert r.dataset.bucketing is False
    assert (r.train.steps, r.train.batch_size, r.train.learning_rate, r.train.seed) == (steps, batch, lr, 42)
    assert r.train.optimizer == "adamw" and r.train.weight_decay == 0.01  # mlx's AdamW default
    assert r.train.guidance == guidance and r.validation.guidance == guidance
    assert (r.validation.steps, r.validation.seed, r.validation.every, r.validation.prompts) == (
        sampling, 42, every, [prompt])
    assert r.save.every == every and r.save.output == f"~/Desktop/{output}"
    assert [(g.blocks, g.start, g.end, g.layer_types, g.rank, g.alpha) for g in r.layers.groups] == [
        (*g, 0.0) for g in groups]
    notes = "\n".join(imported.notes)
    assert f"GGUF Q{bits}" in notes and "FLUX.1-dev" in notes and f"are {steps} steps" in notes
    assert "does not exist" not in notes  # the photos are there


def test_the_prompts_train_as_written_and_steps_follow_mflux_counting(tmp_path):
    """The guide's multi-subject example: each photo its own prompt and trigger, none added."""
    config = json.loads((DATA / "mflux_pets.json").read_text())
    config["examples"]["images"] = [{"image": "dog1.jpg", "prompt": "photo of sks dog"},
                                    {"image": "cat1.jpg", "prompt": "photo of xyz cat"},
                                    {"image": "cat2.jpg", "prompt": "photo of xyz cat"}]
    config["training_loop"] = {"num_epochs": 7, "batch_size": 2}
    (tmp_path / "train.json").write_text(json.dumps(config))
    photos(tmp_path / "images", ["dog1.jpg", "cat1.jpg", "cat2.jpg"])
    imported = formats.load(tmp_path / "train.json")
    assert imported.recipe.train.steps == 7 * 2  # 3 photos in batches of 2: the last batch is smaller
    dataset = build.dataset(imported.recipe.with_settings(["resolution=64"]), tmp_path)
    assert [(i.image.name, i.caption) for i in dataset.items] == [
        ("dog1.jpg", "photo of sks dog"), ("cat1.jpg", "photo of xyz cat"), ("cat2.jpg", "photo of xyz cat")]


def test_keys_that_cant_be_used_are_listed_by_key(tmp_path, caplog):
    config = json.loads((DATA / "mflux_art_style.json").read_text())
    config["low_ram"] = True
    config["training_loop"]["iterator_state_path"] = "it.json"
    config["optimizer"]["name"] = "SGD"
    config["lora_layers"]["transformer_blocks"]["dropout"] = 0.1
    config["lora_layers"]["single_transformer_blocks"]["layer_types"] = ["proj_out", "attn.to_qq"]
    config["examples"]["images"][1] = {"image": "style2.jpg"}
    (tmp_path / "train.json").write_text(json.dumps(config))
    imported = formats.load(tmp_path / "train.json")
    why = {u.key: u.why for u in imported.unsupported}
    assert set(why) == {"low_ram", "training_loop.iterator_state_path", "optimizer.name",
                        "lora_layers.transformer_blocks.dropout", "lora_layers.single_transformer_blocks",
                        "examples.images[1]", *NO_INT8}
    assert "'SGD'" in why["optimizer.name"] and "'attn.to_qq'" in why["lora_layers.single_transformer_blocks"]
    assert "prompt" in why["examples.images[1]"]
    assert [g.blocks for g in imported.recipe.layers.groups] == ["transformer_blocks"]  # the usable group stays
    # train says what it leaves out, then trains the rest; here the layers don't fit the tiny model: before any work
    assert cli.main(["train", "--config", str(tmp_path / "train.json"), "--model", "tiny"]) == 1
    assert "low_ram is not used: not a setting" in caplog.text and "ends at 15" in caplog.text
    assert not list(tmp_path.glob("*_001"))


def test_mflux_layer_names_ranges_of_indices_and_sizes(tmp_path):
    config = json.loads((DATA / "mflux_pets.json").read_text())
    config["lora_layers"] = {"transformer_blocks": {"block_range": {"indices": [7, 0, 1, 2, 8]},
                                                    "layer_types": ["ff.linear1", "attn.to_out"], "lora_rank": 4}}
    config["width"], config["height"] = 768, 512
    (tmp_path / "train.json").write_text(json.dumps(config))
    imported = formats.load(tmp_path / "train.json")
    assert [u.key for u in imported.unsupported] == NO_INT8
    assert [(g.start, g.end, g.layer_types) for g in imported.recipe.layers.groups] == [
        (0, 3, ["ff.net.0.proj", "attn.to_out.0"]), (7, 9, ["ff.net.0.proj", "attn.to_out.0"])]
    assert imported.recipe.dataset.resolution == [624] and imported.recipe.dataset.bucketing is True  # √(768·512)
    notes = "\n".join(imported.notes)
    assert "ff.linear1 is ff.net.0.proj" in notes and "768×512" in notes


def test_examples_path_is_relative_to_the_config_and_tilde_is_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder
    (tmp_path / "configs").mkdir()
    path = template(tmp_path / "configs", "mflux_pets.json")
    assert not any("does not exist" in n for n in formats.load(path).notes)  # configs/images/ beside it
    (tmp_path / "bare").mkdir()
    assert f"examples.path: 'images/' does not exist here ({tmp_path / 'bare' / 'images'}); change examples.path." \
        in formats.load(template(tmp_path / "bare", "mflux_pets.json", with_photos=False)).notes

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = json.loads(path.read_text())
    config["examples"]["path"] = "~/dog_photos"
    path.write_text(json.dumps(config))
    (note,) = [n for n in formats.load(path).notes if "does not exist" in n]
    assert note.startswith("examples.path: '~/dog_photos' does not exist here") and str(tmp_path / "home") in note
    photos(tmp_path / "home" / "dog_photos", [e["image"] for e in config["examples"]["images"][:3]])
    (note,) = [n for n in formats.load(path).notes if n.startswith("examples.images:")][-1:]
    assert "2 of 5 photos are not in" in note and "04.jpg, 05.jpg" in note

    config["examples"]["path"] = "C:\\Users\\me\\images"
    path.write_text(json.dumps(config))
    assert any(n.startswith("examples.path:") and "a Windows path" in n for n in formats.load(path).notes)


def test_a_template_trains_a_few_steps_on_the_tiny_model(tmp_path, tiny_flux, monkeypatch):
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    path = template(tmp_path, "mflux_pets.json")
    tiny_layers = "layers.groups=[{blocks: single_transformer_blocks, end: 4, layer_types: [proj_out], rank: 4}]"
    assert cli.main(["train", "--config", str(path), "--model", "tiny", "--out", str(tmp_path / "runs"),
                     "--set", "steps=2", "--set", "resolution=64", "--set", tiny_layers,
                     "--set", "validation.steps=2", "--set", "validation.before_training=false"]) == 0
    summary = json.loads((tmp_path / "runs" / "flux_lora_001" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2
    assert (tmp_path / "runs" / "flux_lora_001.safetensors").is_file()
