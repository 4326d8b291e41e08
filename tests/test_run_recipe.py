"""A run's recipe, built from what trains (recipe/from_run.py): written into the run folder as our
format and as an ai-toolkit job, each read back by the readers to the same settings; what a file
can't hold named in it and in the log."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from trainer.data import datasets
from trainer.data.augment import Augmentation
from trainer.data.images import Shaping
from trainer.families.flux1.layers import FluxDims
from trainer.loop.config import TrainConfig
from trainer.loop.flow import TimestepSampling
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.outputs.checkpoints import RunSettings
from trainer.recipe import ai_toolkit, build, formats
from trainer.recipe.from_run import AI_TOOLKIT_FILE, RECIPE_FILE, recipe_of_run, validation_section, write_run_recipe
from trainer.recipe.schema import SaveSection, all_keys, value_of

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
DIMS = FluxDims()


@pytest.fixture
def folders(tmp_path):
    """The quickstart photos, and two of them as a regularisation set without captions."""
    reg = tmp_path / "reg"
    reg.mkdir()
    for name in ("01.jpg", "02.jpg"):
        shutil.copy(QUICKSTART / name, reg / name)
    return QUICKSTART, reg


def workflow_dataset(subject: Path, reg: Path) -> datasets.Dataset:
    """As the dataset nodes build it: the subject at two resolutions, then a regularisation set."""
    augment = Augmentation(flip=True, caption_dropout=0.1, shuffle_tags=True)
    parts = [datasets.from_folder(subject, datasets.Options(
        "ohwx", "toy", 2, "auto", "", Shaping(r, True, "random", minimum_image_size=64), augment, "stop", "txt"))
        .with_items(network_weight=0.8) for r in (64, 128)]
    regularisation = [datasets.from_folder(reg, datasets.Options(
        "", "toy", default_caption="a photo of a toy", shaping=Shaping(r, True, "random", minimum_image_size=64)))
        .with_items(regularisation=True, loss_weight=0.5, network_weight=0.0) for r in (64, 128)]
    return parts[0] + regularisation[0] + parts[1] + regularisation[1]  # the recipe's order


SPEC = LayerSpec((LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "ff.net.2"), 8, 4.0, "lokr", 4),
                  LayerGroup("single_transformer_blocks", 10, 38, ("proj_out",), 4, None, "lokr", 8, True),
                  LayerGroup("single_transformer_blocks", 0, 10, ("attn.to_k",), 4, None, "loha")))
CONFIG = TrainConfig(steps=300, learning_rate=3e-4, batch_size=2, seed=9, weight_decay=0.01, guidance=1.0,
                     timesteps=TimestepSampling("sigmoid"), lr_schedule="cosine", warmup_steps=10, ema_decay=0.99,
                     optimizer="adafactor", dop_multiplier=0.5, text_encoder_lr=1e-5, text_encoder_start=0.8)
RUN = RunSettings("ohwx_toy", 50, 3)


def run_recipe(subject, reg, spec=SPEC, config=CONFIG):
    plan = validation_section(["[trigger] on a beach", "a toy"], [7, 7], [3.5, 3.5], [12, 12], 50, 512, 512, False)
    return recipe_of_run(config, spec, DIMS, workflow_dataset(subject, reg), RUN, plan,
                         SaveSection(dtype="bf16", format="kohya"), notes=["model: flux1-dev.safetensors"])


def same_items(a: datasets.Dataset, b: datasets.Dataset) -> None:
    fields = ("image", "caption", "repeats", "trigger_word", "class_word", "shaping", "augment", "loss_weight",
              "network_weight", "regularisation")
    assert [tuple(getattr(i, f) for f in fields) for i in a.items] == \
        [tuple(getattr(i, f) for f in fields) for i in b.items]


def test_the_run_folder_recipe_reads_back_to_the_settings_that_trained(folders, tmp_path, caplog):
    run = run_recipe(*folders)
    with caplog.at_level(logging.WARNING):
        written = write_run_recipe(tmp_path / "run", run)
    assert [p.name for p in written] == [RECIPE_FILE, AI_TOOLKIT_FILE]
    back = formats.load(tmp_path / "run" / RECIPE_FILE)
    assert back.format == "ours" and back.unsupported == [] and back.recipe == run.recipe
    r = back.recipe
    assert r.train == CONFIG and (r.save.name, r.save.every, r.save.keep_last, r.save.dtype) == ("ohwx_toy", 50, 3,
                                                                                                   "bf16")
    assert (r.validation.prompts, r.validation.seed, r.validation.steps, r.validation.size) == \
        (["[trigger] on a beach", "a toy"], 7, 12, 512)
    assert r.dataset.resolution == [64, 128] and r.dataset.regularisation_caption == "a photo of a toy"
    # what trains from the file: the same photos with the same options, the same layers
    same_items(build.dataset(r, tmp_path / "run"), workflow_dataset(*folders))
    assert build.layer_spec(r, DIMS).targets(DIMS) == SPEC.targets(DIMS)
    assert "model: flux1-dev.safetensors" in (tmp_path / "run" / RECIPE_FILE).read_text()
    assert "model: flux1-dev.safetensors" in caplog.text  # what the file can't hold, in the log too


def test_the_ai_toolkit_job_reads_back_to_the_same_settings_but_what_its_comment_names(folders, tmp_path):
    spec = LayerSpec.preset("attention+mlp", DIMS, rank=16)
    config = TrainConfig(steps=300, learning_rate=3e-4, batch_size=2, seed=9, weight_decay=0.01, lr_schedule="cosine",
                         ema_decay=0.99, optimizer="adafactor", dop_multiplier=0.5)
    run = run_recipe(*folders, spec=spec, config=config)
    write_run_recipe(tmp_path / "run", run)
    job = (tmp_path / "run" / AI_TOOLKIT_FILE).read_text()
    back = formats.load(tmp_path / "run" / AI_TOOLKIT_FILE)
    assert back.format == "ai-toolkit" and back.unsupported == []
    r = back.recipe
    assert r.train.steps == 300 and r.train.optimizer == "adafactor" and r.train.ema_decay == 0.99
    assert r.train.dop_multiplier == 0.5 and r.train.lr_schedule == "cosine"
    assert (r.dataset.folders, r.dataset.regularisation) == (run.recipe.dataset.folders,
                                                             run.recipe.dataset.regularisation)
    assert (r.dataset.trigger, r.dataset.repeats, r.dataset.resolution, r.dataset.network_weight) == \
        ("ohwx", 2, [64, 128], 0.8)
    assert build.layer_spec(r, DIMS).targets(DIMS) == spec.targets(DIMS)
    assert (r.save.name, r.save.every, r.save.keep_last, r.save.dtype) == ("ohwx_toy", 50, 3, "bf16")
    export = ai_toolkit.export(run.recipe)  # every other setting reads back the same
    named = set(export.lost) | {c.split(":")[0].split(" ")[0] for c in export.caveats}
    differing = {k.path for k in all_keys()
                 if "[]" not in k.path and value_of(r, k.path) != value_of(run.recipe, k.path)}
    assert differing and differing <= named
    comment = job.split("\njob:")[0]
    assert all(f"#   {key}: " in comment for key in export.lost)
    assert "model: flux1-dev.safetensors" in comment and "#   train.seed: " in comment  # its seed: not in ai-toolkit
    assert "#   dataset.minimum_image_size: " in comment


def test_images_from_other_nodes_and_a_second_subject_are_named_not_dropped(folders, tmp_path, caplog):
    subject, reg = folders
    pixels = torch.rand(2, 64, 64, 3)
    dataset = (datasets.from_folder(subject, datasets.Options("sks", "toy", shaping=Shaping(64)))
               + datasets.from_folder(reg, datasets.Options("ohwx", "dog", default_caption="a dog",
                                                            shaping=Shaping(64)))
               + datasets.from_images(pixels, ["a photo of [trigger]"], datasets.Options("sks", shaping=Shaping(64))))
    run = recipe_of_run(TrainConfig(), LayerSpec.preset("attention", DIMS), DIMS, dataset, RunSettings())
    assert run.recipe.dataset.folders == [str(subject), str(reg)] and run.recipe.layers.preset == "attention"
    with caplog.at_level(logging.WARNING):
        write_run_recipe(tmp_path, run)
    text = (tmp_path / RECIPE_FILE).read_text()
    for words in ("2 image(s) from images came as an IMAGE batch", f"dataset {reg}: trigger_word 'ohwx'",
                  "subjects sks, ohwx: the recipe has one trigger word"):
        assert words in text and words in caplog.text
    assert formats.load(tmp_path / RECIPE_FILE).recipe == run.recipe


def test_a_flux2_run_writes_our_recipe_and_no_ai_toolkit_job_naming_flux1(folders, tmp_path, caplog):
    """ai-toolkit jobs name FLUX.1-dev and its layers: a FLUX.2 run's would train something else."""
    from trainer.families.flux2.layers import Flux2Dims

    dims = Flux2Dims()
    dataset = datasets.from_folder(folders[0], datasets.Options("sks", "toy", shaping=Shaping(64)))
    run = recipe_of_run(TrainConfig(), LayerSpec.preset("attention", dims), dims, dataset, RunSettings())
    assert run.family == "flux2"
    with caplog.at_level(logging.WARNING):
        written = write_run_recipe(tmp_path, run)
    assert written == [tmp_path / RECIPE_FILE] and not (tmp_path / AI_TOOLKIT_FILE).exists()
    assert f"no {AI_TOOLKIT_FILE} (this pack writes ai-toolkit jobs for FLUX.1 runs; this one trained FLUX.2)" \
        in caplog.text
    assert formats.load(tmp_path / RECIPE_FILE).recipe == run.recipe
