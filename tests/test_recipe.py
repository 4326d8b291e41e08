"""Our recipe format: keys from the dataclasses, unknown keys with close matches, values by the
field's type, round trips through YAML and JSON, and the README listing every key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from trainer.families.flux1.layers import FluxDims
from trainer.loop.trainer import TrainConfig
from trainer.recipe import build, formats, text
from trainer.recipe.fields import Reader, RecipeError
from trainer.recipe.schema import Recipe, all_keys

ROOT = Path(__file__).resolve().parents[1]


def changed_recipe() -> Recipe:
    """A recipe with a value of every kind changed from its default (text with quotes and a colon,
    lists, a float in e-notation, nested sections)."""
    return Recipe().with_settings([
        "dataset.folders=[photos, '~/more photos']", "dataset.trigger=ohwx", "dataset.class_word=person",
        "dataset.resolution=512,1024", "dataset.bucketing=false", "dataset.caption_dropout=0.2",
        "layers.layer_types=[attn.to_q, proj_out]", "layers.blocks=single_transformer_blocks", "layers.start=10",
        "rank=32", "alpha=16", "steps=750", "learning_rate=5e-5", "train.timesteps.mode=uniform",
        "train.memory.swap_blocks=3", "ema_decay=0.999", "save.dtype=bf16", "save_every=50", "loss=huber",
        "optimizer_args=betas=[0.9,0.99], eps=1e-8",
        'validation.prompts=["a photo of [trigger]: \\"smiling\\", outdoors", "[trigger] on a beach"]',
        "layers.groups=[{blocks: transformer_blocks, end: 10, layer_types: [attention], rank: 8},"
        " {blocks: single_transformer_blocks, start: 10, layer_types: [proj_out], rank: 4, alpha: 2}]",
    ])


def test_keys_come_from_the_dataclasses_so_new_train_fields_need_no_change():
    paths = [k.path for k in all_keys()]
    for f in dataclasses.fields(TrainConfig):
        assert any(p == f"train.{f.name}" or p.startswith(f"train.{f.name}.") for p in paths), f.name
    assert "train.timesteps.mode" in paths and "train.memory.swap_blocks" in paths
    ours = [k for k in all_keys() if not k.path.startswith("train.")]  # TrainConfig's help is its comments
    assert all(k.help for k in ours), [k.path for k in ours if not k.help]


def test_a_recipe_reads_back_from_its_yaml_and_json_to_the_same_settings():
    recipe = changed_recipe()
    assert recipe != Recipe()
    assert recipe.train.learning_rate == 5e-5 and recipe.dataset.resolution == [512, 1024]
    assert recipe.validation.prompts[0] == 'a photo of [trigger]: "smiling", outdoors'
    assert recipe.train.optimizer_args == {"betas": [0.9, 0.99], "eps": 1e-8}  # kohya's --optimizer_args style
    assert recipe.train.loss.kind == "huber"  # a section given one value sets its first key
    written = text.to_yaml(recipe)
    assert "# LoRA rank" in written  # the help travels with the file
    assert text.loads(written) == recipe
    assert text.loads(text.to_yaml(recipe, comments=False)) == recipe
    assert text.loads(text.to_json(recipe)) == recipe


def test_layer_groups_each_train_their_blocks_at_their_rank():
    spec = build.layer_spec(changed_recipe(), FluxDims())
    targets = spec.targets(FluxDims())
    double = [t for t in targets if t.bfl_module.startswith("double_blocks")]
    single = [t for t in targets if t.bfl_module.startswith("single_blocks")]
    assert len(double) == 10 * 8 and {t.rank for t in double} == {8}  # the attention preset: 8 layers a block
    assert len(single) == 28 and {(t.rank, t.scale) for t in single} == {(4, 0.5)}
    without_groups = Recipe().with_settings(["layers.layer_types=[proj_out]", "layers.start=30", "rank=2"])
    assert len(build.layer_spec(without_groups, FluxDims()).targets(FluxDims())) == 8  # single 30–37
    with pytest.raises(RecipeError, match="block_range"):
        build.layer_spec(Recipe().with_settings(["layers.layer_types=[proj_out]", "layers.start=40"]), FluxDims())


def test_unknown_keys_name_the_close_matches_and_bad_values_name_the_key():
    reader = Reader()
    recipe = Recipe.from_dict({"train": {"stpes": 5, "learning_rate": "1e-4", "timesteps": "uniform"},
                               "datset": {}, "save": {"keep_last": "many"}}, reader)
    unknown = dict(reader.unknown)
    assert "train.steps" in unknown["train.stpes"] and "'dataset'" in unknown["datset"]
    assert reader.invalid[0][0] == "save.keep_last" and "whole number" in reader.invalid[0][1]
    assert recipe.train.learning_rate == 1e-4 and recipe.train.timesteps.mode == "uniform"
    assert reader.honoured == ["train.learning_rate", "train.timesteps"]
    with pytest.raises(RecipeError, match="train.stpes"):
        Recipe.from_dict({"train": {"stpes": 5}})
    with pytest.raises(RecipeError, match="train: steps"):
        Recipe.from_dict({"train": {"steps": 0}})


def test_set_takes_dotted_keys_and_short_ones_parsed_by_type():
    recipe = Recipe().with_settings(["steps=10", "resolution=128", "save.keep_last=0", "train.seed=7",
                                     "dataset.flip=yes", "lr_schedule=cosine"])
    assert recipe.train.steps == 10 and recipe.dataset.resolution == [128]
    assert recipe.save.keep_last == 0 and recipe.train.seed == 7
    assert recipe.dataset.flip is True and recipe.train.lr_schedule == "cosine"
    for bad, match in [("steps=ten", "train.steps is 'ten'"), ("stesp=3", "did you mean 'steps'"),
                       ("learning_rate=nan", "train.learning_rate"), ("steps", "key=value"),
                       ("lr_schedule=wavy", "train: lr_schedule"), ("save.dtype=fp8", "save.dtype")]:
        with pytest.raises(RecipeError, match=match):
            Recipe().with_settings([bad])


def test_optimizer_and_its_arguments_are_keys_that_read_back_the_same():
    recipe = Recipe().with_settings(["optimizer=Prodigy", "train.optimizer_args=d_coef=2 betas=0.9,0.99"])
    assert recipe.train.optimizer == "prodigy"  # other tools' spellings become ours
    assert recipe.train.optimizer_args == {"d_coef": 2, "betas": (0.9, 0.99)}
    for written in (text.to_yaml(recipe), text.to_json(recipe)):
        back = text.loads(written)
        assert back.train.optimizer == "prodigy" and back.train.optimizer_args == {"d_coef": 2, "betas": [0.9, 0.99]}
    with pytest.raises(RecipeError, match="train.optimizer_args"):
        Recipe().with_settings(["train.optimizer_args=d_coef"])
    with pytest.raises(RecipeError, match="no_such_arg.*Lion"):
        Recipe().with_settings(["optimizer=lion", "train.optimizer_args=no_such_arg=1"])


def test_the_format_is_told_by_content_not_by_the_file_name(tmp_path):
    read = {"mflux.json": ('{"model": "dev", "training_loop": {"num_epochs": 10}, "lora_layers": {}}', "mflux"),
            "args.txt": ("accelerate launch train_dreambooth_lora_flux.py \\\n  --pretrained_model_name_or_path=x \\\n"
                         "  --instance_data_dir=dog\n", "diffusers"),
            "job.yaml": ("job: extension\nconfig:\n  name: x\n  process:\n    - type: sd_trainer\n", "ai-toolkit"),
            "config.json": ('{"--model_family": "flux", "--lora_rank": 16}', "simpletuner")}
    for name, (content, fmt) in read.items():
        (tmp_path / name).write_text(content)
        assert formats.load(tmp_path / name).format == fmt
    (tmp_path / "ours.txt").write_text("train:\n  steps: 5\n")  # any file name
    assert formats.load(tmp_path / "ours.txt").format == "ours"
    for content, match in [("{not json", "not valid JSON"), ("a: [b", "not valid YAML"), ("just words", "no settings"),
                           ("food: pizza", "not a training config")]:
        (tmp_path / "bad.yaml").write_text(content)
        with pytest.raises(text.UnreadableConfig, match=match):
            formats.load(tmp_path / "bad.yaml")


def test_the_readme_lists_every_key_of_the_format():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- recipe-keys:start -->(.*)<!-- recipe-keys:end -->", readme, re.S)
    assert block, "README.md needs the recipe keys table between <!-- recipe-keys:start/end --> markers"
    listed = set(re.findall(r"^\| `([\w.\[\]]+)`", block.group(1), re.M))
    missing = [k.path for k in all_keys() if k.path not in listed]
    assert missing == [], f"README lacks {missing}: run `python -m trainer keys --readme README.md`"


def test_keys_readme_rewrites_only_the_table_between_the_markers(tmp_path):
    from trainer import cli

    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- recipe-keys:start -->\n| `train.old` | stale |\n<!-- recipe-keys:end -->\nEnd.\n")
    assert cli.main(["keys", "--readme", str(readme)]) == 0
    written = readme.read_text()
    assert written.startswith("# Title\n") and written.endswith("<!-- recipe-keys:end -->\nEnd.\n")
    assert "train.old" not in written and all(f"| `{k.path}`" in written for k in all_keys())
    (tmp_path / "other.md").write_text("no markers")
    assert cli.main(["keys", "--readme", str(tmp_path / "other.md")]) == 1


def test_dataset_keys_reach_the_images_and_captions(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        Image.new("RGB", (2000, 1000)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.caption").write_text(f"sks, red, {name}, table")
    recipe = Recipe().with_settings(["dataset.folders=[.]", "dataset.caption_ext=caption", "resolution=64",
                                     "dataset.shuffle_tags=true", "dataset.maximum_image_size=1024",
                                     "dataset.target_downsample_size=512", "dataset.minimum_image_size=100"])
    item = build.dataset(recipe, tmp_path).items[0]
    assert item.written == "sks, red, a, table" and item.augment.shuffle_tags
    assert (item.shaping.maximum_image_size, item.shaping.target_downsample_size, item.shaping.minimum) == \
        (1024, 512, 100)
    with pytest.raises(RecipeError, match="target_downsample_size 2048 is above maximum_image_size 1024"):
        recipe.with_settings(["dataset.target_downsample_size=2048"])


def test_pasted_text_reads_like_a_file_and_its_layers_fit_the_model_when_it_is_known(tmp_path):
    (tmp_path / "photos").mkdir()
    pasted = formats.loads("dataset: {folders: [photos, gone]}\nlayers: {preset: attention, rank: 4}\n"
                           "train: {steps: 7}\n", tmp_path / "pasted config")
    assert pasted.format == "ours" and pasted.recipe.train.steps == 7
    assert [n for n in pasted.notes if "gone" in n] and not [n for n in pasted.notes if "'photos'" in n]
    assert pasted.summary()[0] == "Honoured (4): dataset.folders, layers.preset, layers.rank, train.steps"
    small, full = FluxDims(double_blocks=2, single_blocks=3), FluxDims()
    layers = build.RecipeLayers(pasted.recipe)
    assert {g.end for g in layers.resolved(small).groups} == {2, 3}  # each model's own depths
    assert {g.end for g in layers.resolved(full).groups} == {19, 38}
    spec = build.layer_spec(pasted.recipe, small)
    assert spec.resolved(small) is spec
    with pytest.raises(RecipeError, match="dataset.folders.* does not exist"):
        build.check_paths(pasted.recipe, tmp_path)
    # with the imported file's own key
    with pytest.raises(RecipeError, match=r"^folder_path\[1\] is 'gone'.*Change folder_path "):
        build.check_paths(pasted.recipe, tmp_path, {"dataset.folders": "folder_path"})
