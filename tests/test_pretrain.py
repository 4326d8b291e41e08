"""Pretraining the tiny FLUX: each stage learns, the VAE's normalisation is exact, and what the
script writes is what the loader reads. (The full-length run and its figures: README, "Pretraining".)"""

import dataclasses
import random

import torch

from trainer.families.conditioning import Conditioning
from trainer.families.flux1 import tiny
from trainer.pretrain import autoencoder, denoiser, run, world


def _scenes(n: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    return autoencoder.to_pixels([world.draw(world.random_scene(rng), size, 0.3, rng) for _ in range(n)])


def test_the_vae_stage_lowers_the_reconstruction_error_on_scenes_it_never_saw():
    model = tiny.build(0, hidden_heads=1)
    held_out = _scenes(8, 32, seed=99)
    before = autoencoder.reconstruction_error(model.vae, held_out)
    settings = autoencoder.VaeSettings(steps=250, batch_size=8, size=32)
    autoencoder.train_vae(model.vae, settings, seed=0, photos=run.QUICKSTART_PHOTOS)
    after = autoencoder.reconstruction_error(model.vae, held_out)
    assert after < 0.7 * before, (before, after)


def test_normalising_the_vae_gives_flux_latents_and_keeps_its_reconstructions():
    model = tiny.build(1, hidden_heads=1)
    images = _scenes(8, 64)
    before = model.vae.decode(model.vae.encode(images * 2 - 1).latent_dist.mode()).sample
    autoencoder.normalise(model.vae, images, tiny.VAE_SCALE, tiny.VAE_SHIFT)
    z = model.encode_images(images)
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-4
    after = model.vae.decode(model.vae.encode(images * 2 - 1).latent_dist.mode()).sample
    assert torch.allclose(before, after, atol=1e-4)


def test_the_denoiser_stage_lowers_the_flow_matching_loss_and_trains_the_text_encoders():
    model = tiny.build(2, hidden_heads=1)
    t5_before = [p.clone() for p in model.t5.parameters()]
    settings = denoiser.DenoiserSettings(steps=50, batch_size=8, size=32, scenes=32, learning_rate=2e-3)
    losses = denoiser.train_denoiser(model, settings, seed=0)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    assert any(not torch.equal(a, b) for a, b in zip(t5_before, model.t5.parameters()))
    assert not any(p.requires_grad for p in model.transformer.parameters())  # frozen again, as build leaves it


def test_the_written_weights_load_back_as_the_same_model(tmp_path):
    settings = run.PretrainSettings(seed=3, sample_steps=2)
    settings = dataclasses.replace(settings, vae=dataclasses.replace(settings.vae, steps=1, batch_size=2, size=32),
                                   denoiser=dataclasses.replace(settings.denoiser, steps=1, batch_size=2, size=32,
                                                                scenes=4))
    report = run.pretrain(tmp_path, settings)
    assert len(report["prompt_check"]) == 5 and {"seconds", "vae_reconstruction_l1"} <= report.keys()
    loaded = tiny.load_pretrained(tmp_path)
    assert loaded.pretrained and "pretrained" in loaded.name
    fresh = tiny.build(3, **run.MODEL_SHAPE)
    cond = Conditioning.of([loaded.encode_text("a red circle on a blue background, top left")], 3.5)
    args = (torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7]), cond)
    with torch.no_grad():
        v_loaded, v_fresh = loaded.backend().velocity(*args), fresh.backend().velocity(*args)
    assert not torch.allclose(v_loaded, v_fresh, atol=1e-3)  # trained weights, not the seed's random ones
    (tmp_path / "vae.safetensors").unlink()
    try:
        tiny.load_pretrained(tmp_path)
    except FileNotFoundError as e:
        assert "vae.safetensors" in str(e) and "python -m trainer pretrain" in str(e)
    else:
        raise AssertionError("a missing file must be named")
