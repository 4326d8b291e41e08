import math

import pytest
import torch

from trainer.families.flux1 import FAMILY as FLUX1
from trainer.loop import flow


def test_noisy_latents_interpolate_from_image_to_noise():
    z, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    z_sigma = flow.noisy_latents(z, eps, sigmas)
    assert torch.equal(z_sigma[0], z[0])
    assert torch.allclose(z_sigma[1], 0.75 * z[1] + 0.25 * eps[1])
    assert torch.equal(z_sigma[2], eps[2])


def test_velocity_is_the_derivative_along_the_path():
    z, eps = torch.randn(1, 16, 4, 4, dtype=torch.float64), torch.randn(1, 16, 4, 4, dtype=torch.float64)
    h = 1e-6
    s = torch.tensor([0.4], dtype=torch.float64)
    numeric = (flow.noisy_latents(z, eps, s + h) - flow.noisy_latents(z, eps, s - h)) / (2 * h)
    assert torch.allclose(numeric, flow.velocity_target(z, eps), atol=1e-8)


def test_loss_is_per_sample_mse():
    pred, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    target[1] *= 2
    assert torch.equal(flow.flow_matching_loss(pred, target), torch.tensor([1.0, 4.0]))


def test_flux_shift_matches_its_anchor_points():
    assert flow.flux_mu(256) == pytest.approx(0.5)
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    t = torch.linspace(0.05, 0.95, 19)
    shifted = flow.time_shift(1.15, t)
    assert torch.all(shifted > t) and torch.all(shifted[1:] > shifted[:-1])
    assert flow.time_shift(0.0, t) == pytest.approx(t)


@pytest.mark.parametrize("mode", flow.TIMESTEP_SAMPLINGS)
def test_timestep_sampling_is_seeded_and_in_range(mode):
    sampling = flow.TimestepSampling(mode)
    a = sampling.sample(4000, 1024, torch.Generator().manual_seed(1))
    b = sampling.sample(4000, 1024, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_timestep_distributions_differ_as_documented():
    def g():
        return torch.Generator().manual_seed(0)

    uniform = flow.TimestepSampling("uniform").sample(20000, 256, g())
    logit = flow.TimestepSampling("logit_normal", logit_mean=0.0, logit_std=1.0).sample(20000, 256, g())
    small = flow.TimestepSampling("flux_shift").sample(20000, 256, g())
    large = flow.TimestepSampling("flux_shift").sample(20000, 4096, g())
    assert abs(uniform.mean() - 0.5) < 0.01
    assert logit.std() < uniform.std()  # logit-normal concentrates mid-noise
    assert abs(logit.median() - 0.5) < 0.02
    assert large.mean() > small.mean() + 0.05  # bigger images train at noisier σ


def test_bad_timestep_setting_names_the_choices():
    with pytest.raises(ValueError, match="uniform"):
        flow.TimestepSampling("cosmic")


def test_sampling_sigmas_run_from_noise_to_image():
    s = flow.sampling_sigmas(20, 1024)
    assert s[0] == pytest.approx(1.0) and s[-1] == 0.0 and len(s) == 21
    assert torch.all(s[1:] < s[:-1])
    assert FLUX1.tokens(128, 128) == 4096 and not math.isnan(float(s.sum()))  # 1024² in 2×2 patches


def _draw(n=20000, seq=256, **settings):
    return flow.TimestepSampling(**settings).sample(n, seq, torch.Generator().manual_seed(0))


def test_sigmoid_is_ai_toolkits_logit_normal_at_zero_one():
    sigmoid = _draw(mode="sigmoid", logit_mean=2.0)  # ai-toolkit's sigmoid ignores the logit settings
    assert abs(sigmoid.median() - 0.5) < 0.02 and torch.equal(sigmoid, _draw(mode="logit_normal"))
    shifted = _draw(mode="logit_normal", logit_mean=1.0)
    assert shifted.median() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.02)  # sigmoid(mean)


def test_fixed_shift_moves_mass_to_high_sigma():
    assert flow.fixed_shift(3.0, torch.tensor([0.5])).item() == pytest.approx(0.75)  # 3·½ / (1 + 2·½)
    plain, shifted = _draw(mode="sigmoid"), _draw(mode="sigmoid", shift=3.0)
    assert shifted.median() == pytest.approx(0.75, abs=0.02) and shifted.mean() > plain.mean() + 0.15
    assert torch.all(shifted >= plain)  # the same draws, each moved up


def test_mode_and_cosmap_densities():
    uniform, mode = _draw(mode="uniform"), _draw(mode="mode", mode_scale=1.29)
    assert mode.std() < uniform.std() - 0.03 and abs(mode.mean() - 0.5) < 0.01  # mass at mid σ, symmetric
    assert torch.allclose(_draw(mode="mode", mode_scale=0.0), 1 - uniform)  # scale 0: uniform
    cosmap = _draw(n=200000, mode="cosmap")
    counts = torch.histc(cosmap, bins=10, min=0, max=1) / len(cosmap)
    centres = torch.linspace(0.05, 0.95, 10)
    density = 2 / (math.pi * (1 - 2 * centres + 2 * centres**2))  # SD3 paper's π_CosMap
    assert torch.allclose(counts * 10, density, rtol=0.03)


def test_weighted_is_uniform_with_a_bell_loss_weight():
    sampling = flow.TimestepSampling("weighted")
    sigmas = _draw(mode="weighted")
    assert torch.equal(sigmas, _draw(mode="uniform"))
    weights = sampling.loss_weights(sigmas)
    assert weights.mean() == pytest.approx(1.0, abs=0.01)
    ends = sampling.loss_weights(torch.tensor([0.0, 0.5, 1.0]))
    assert ends[0] == pytest.approx(0.0, abs=1e-6) and ends[2] == pytest.approx(0.0, abs=1e-6)
    assert ends[1] == pytest.approx((1 - math.exp(-0.5)) / 0.24908, rel=1e-3)
    assert torch.equal(flow.TimestepSampling("sigmoid").loss_weights(sigmas[:5]), torch.ones(5))


@pytest.mark.parametrize("settings, message", [
    ({"mode": "flux_shift", "shift": 3.0}, "already shifts by image size"),
    ({"mode": "sigmoid", "shift": 0.0}, "shift is 0.0"),
    ({"mode": "mode", "mode_scale": 5.0}, "mode_scale is 5.0"),
])
def test_bad_timestep_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        flow.TimestepSampling(**settings)
