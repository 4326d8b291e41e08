"""FLUX.1 Kontext edit pairs on the CPU: pairing errors, the control's cached latents, the loss on
the target's tokens only, and a tiny Kontext run whose fixed-noise loss falls."""

import shutil
from pathlib import Path

import pytest
import torch

from trainer.data import controls, datasets
from trainer.data.encode import EncodeCache, clear_memory, encode_dataset
from trainer.data.images import Shaping
from trainer.families.conditioning import Conditioning
from trainer.loop.trainer import TrainConfig, fixed_noise_loss, train
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet

PAIRS = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "kontext"
OPTIONS = datasets.Options(shaping=Shaping(64, bucketing=False))


def paired(targets=PAIRS / "targets", control=PAIRS / "controls", options=OPTIONS):
    return controls.with_controls(datasets.from_folder(targets, options), control)


@pytest.fixture
def pairs(tmp_path):
    shutil.copytree(PAIRS, tmp_path / "kontext")
    return tmp_path / "kontext"


def test_every_photo_gets_its_same_named_control():
    dataset = paired()
    assert len(dataset) == 7 and controls.has_controls(dataset)
    assert all(i.control.parent == PAIRS / "controls" and i.control.stem == i.image.stem for i in dataset.items)


def test_a_missing_or_doubled_or_broken_control_is_named_before_anything_loads(pairs):
    (pairs / "controls" / "02_green_circle.png").unlink()
    shutil.copy(pairs / "controls" / "03_green_square.png", pairs / "controls" / "03_green_square.jpg")
    (pairs / "controls" / "04_blue_triangle.png").write_bytes(b"not a png")
    with pytest.raises(datasets.DatasetError) as e:
        paired(pairs / "targets", pairs / "controls")
    message = str(e.value)
    assert len(e.value.problems) == 3, message
    assert "02_green_circle.png has no control image" in message and "02_green_circle.*" in message
    assert "03_green_square.png has 2 control images (03_green_square.jpg, 03_green_square.png)" in message
    assert "04_blue_triangle.png" in message and "replace it" in message


@pytest.mark.parametrize("folder, says", [("", "control_folder is empty"), ("/nonexistent/controls", "does not exist")])
def test_a_bad_control_folder_is_named(folder, says):
    with pytest.raises(datasets.DatasetError, match=says):
        paired(control=folder)


def test_images_from_a_node_and_a_mix_of_pairs_and_plain_photos_are_refused():
    from_node = datasets.from_images(torch.rand(1, 64, 64, 3), ["a photo"], OPTIONS)
    with pytest.raises(datasets.DatasetError, match="matched by file name"):
        controls.with_controls(from_node, PAIRS / "controls")
    with pytest.raises(datasets.DatasetError, match="give every chained dataset its control_folder"):
        controls.has_controls(paired() + datasets.from_folder(PAIRS / "targets", OPTIONS))


def test_encoding_caches_the_control_shaped_as_its_target(tiny_flux, tmp_path):
    clear_memory()
    cache = EncodeCache(tmp_path / "cache", memory=False)
    first, _ = encode_dataset(paired(), tiny_flux, cache)
    assert cache.misses == 7 + 4  # each pair's latents (target and control, one entry) and the 4 captions
    again = EncodeCache(tmp_path / "cache", memory=False)
    second, _ = encode_dataset(paired(), tiny_flux, again)
    assert again.misses == 0 and again.hits == cache.hits + cache.misses
    for a, b in zip(first, second):
        assert a.control is not None and a.control.shape == a.latents.shape
        assert torch.equal(a.control, b.control) and not torch.equal(a.control, a.latents)
    plain, _ = encode_dataset(datasets.from_folder(PAIRS / "controls", datasets.Options(
        default_caption="x", shaping=Shaping(64, bucketing=False))), tiny_flux)
    assert torch.allclose(first[0].control, plain[0].latents)  # the control image, encoded as a photo of its own


def test_a_control_of_another_size_is_resized_to_its_target_then_cropped_alike(tiny_flux, pairs):
    """As ai-toolkit does: a control stretched to 2:1 is brought back to its target's size first, so
    it encodes (up to resampling) as the original, not as the centre of a wide image."""
    from PIL import Image

    control = pairs / "controls" / "01_blue_circle.png"
    original = Image.open(control).convert("RGB")
    original.resize((192, 96), Image.LANCZOS).save(control)
    wide, _ = encode_dataset(paired(pairs / "targets", pairs / "controls"), tiny_flux)
    same, _ = encode_dataset(paired(), tiny_flux)
    other, _ = encode_dataset(paired(pairs / "targets", PAIRS / "controls", datasets.Options(
        shaping=Shaping(64, bucketing=False))), tiny_flux)
    close = (wide[0].control - same[0].control).abs().mean()
    apart = (same[0].control - other[1].control).abs().mean()  # another pair's control, for scale
    assert close < 0.2 * apart, (close, apart)


def test_the_loss_ignores_the_reference_tokens(tiny_flux):
    """Whatever the model outputs on the reference's tokens, the velocity (and so the loss) is the
    target's: scramble those outputs and nothing changes."""
    backend = tiny_flux.backend()
    g = torch.Generator().manual_seed(0)
    latents, ref = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    cond = Conditioning(torch.randn(1, 64, tiny_flux.transformer.config.joint_attention_dim, generator=g),
                        torch.randn(1, tiny_flux.transformer.config.pooled_projection_dim, generator=g), 1.0, (ref,))
    sigmas = torch.tensor([0.5])
    v = backend.velocity(latents, sigmas, cond)
    target = 16  # 8×8 latent pixels in 2×2 patches

    def scramble(_module, _args, out):
        out = out.clone()
        out[:, target:] = torch.randn_like(out[:, target:]) * 100
        return out

    handle = tiny_flux.transformer.proj_out.register_forward_hook(scramble)
    try:
        scrambled = backend.velocity(latents, sigmas, cond)
    finally:
        handle.remove()
    assert v.shape == latents.shape and torch.equal(v, scrambled)
    # and the reference does reach the target's tokens (through attention)
    assert not torch.allclose(v, backend.velocity(latents, sigmas, Conditioning(cond.context, cond.pooled, 1.0,
                                                                                (ref * 0,))))


def test_fixed_noise_loss_falls_by_a_fifth_on_tiny_kontext(tiny_flux):
    examples, _ = encode_dataset(paired(), tiny_flux)
    backend = tiny_flux.backend()
    lora = LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=8).targets(backend.dims), torch.float32, 0)
    before = fixed_noise_loss(backend, lora, examples)
    calls = []
    real = backend.velocity
    backend.velocity = lambda x, s, c: calls.append(len(c.references)) or real(x, s, c)
    result = train(backend, lora, examples, TrainConfig(steps=30, learning_rate=4e-3, seed=0))
    backend.velocity = real
    after = fixed_noise_loss(backend, lora, examples)
    assert result.steps_done == 30 and set(calls) == {1}  # every step saw its reference
    assert after < 0.8 * before, (before, after)


AI_TOOLKIT_KONTEXT = """\
job: extension
config:
  name: recolour_kontext
  process:
    - type: sd_trainer
      network:
        type: lora
        linear: 16
        linear_alpha: 16
      datasets:
        - folder_path: {targets}
          control_path: {controls}
          caption_ext: txt
          resolution: [64]
      train:
        steps: 3
        lr: 1e-4
        batch_size: 1
      model:
        name_or_path: black-forest-labs/FLUX.1-Kontext-dev
        arch: flux_kontext
"""


def test_an_ai_toolkit_kontext_job_imports_its_control_path_and_builds_pairs(pairs):
    from trainer.recipe import ai_toolkit, build, formats

    path = pairs / "job.yaml"
    path.write_text(AI_TOOLKIT_KONTEXT.format(targets="targets", controls="controls"))
    imported = formats.load(path)
    assert not [u.key for u in imported.unsupported if "control" in u.key], imported.unsupported
    assert imported.recipe.dataset.control_path == ["controls"]
    dataset = build.dataset(imported.recipe, pairs)
    assert controls.has_controls(dataset) and dataset.items[0].control == pairs / "controls" / "01_blue_circle.png"
    again = formats.loads(ai_toolkit.write(imported.recipe), path)  # written back as ai-toolkit, read again
    assert again.recipe.dataset.control_path == ["controls"]


def test_a_recipe_names_a_missing_control_path_and_a_count_that_does_not_match(pairs):
    from trainer.recipe import build, formats
    from trainer.recipe.fields import RecipeError

    path = pairs / "job.yaml"
    path.write_text(AI_TOOLKIT_KONTEXT.format(targets="targets", controls="no_such_folder"))
    imported = formats.load(path)
    with pytest.raises(RecipeError, match=r"control_path.*no_such_folder.*does not exist"):
        build.check_paths(imported.recipe, pairs, imported.origins)
    from trainer.recipe.schema import DatasetSection

    with pytest.raises(RecipeError, match="control_path names 2 folder"):
        DatasetSection(folders=["a"], control_path=["b", "c"])


def test_the_command_line_trains_pairs_into_a_kontext_lora_whose_samples_edit_the_first_control(pairs, capsys):
    from trainer import cli
    from trainer.outputs import export

    recipe = pairs / "recipe.yaml"
    recipe.write_text("dataset:\n  folders: [targets]\n  control_path: [controls]\n  trigger: ''\n  resolution: [64]\n"
                      "  bucketing: false\ntrain:\n  steps: 2\nvalidation:\n  prompts: ['make the circle red']\n"
                      "  every: 2\n  steps: 2\n  before_training: false\nsave:\n  name: edit\n  output: runs\n")
    seen = []
    from trainer.families.flux1 import diffusers as flux1_diffusers

    real = flux1_diffusers.DiffusersFlux.velocity
    flux1_diffusers.DiffusersFlux.velocity = lambda self, x, s, c: seen.append(len(c.references)) or real(self, x, s, c)
    try:
        assert cli.main(["train", "--config", str(recipe), "--model", "tiny"]) == 0
    finally:
        flux1_diffusers.DiffusersFlux.velocity = real
    meta = export.read_metadata(pairs / "runs" / "edit_001.safetensors")
    assert meta["modelspec.architecture"] == "flux-1-kontext-dev/lora" and meta["dreambooth.family"] == "flux1"
    assert set(seen) == {1}  # training, the fixed-noise loss and the samples all saw the reference
    assert sorted((pairs / "runs" / "edit_001" / "samples").glob("step_000002_*.png"))
    ran = (pairs / "runs" / "edit_001" / "recipe.yaml").read_text()
    assert "control_path" in ran and str(pairs / "controls") in ran
