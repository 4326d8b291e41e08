import math

import pytest
import torch

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
    assert flow.image_seq_len(128, 128) == 4096 and not math.isnan(float(s.sum()))
