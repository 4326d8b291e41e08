import math

import pytest
import torch

from trainer.loop.losses import LossSettings, huber, pseudo_huber
from trainer.loop.trainer import TrainConfig


def _residual_loss(kind, r, c=0.1):
    r = torch.as_tensor([float(r)]).view(1, 1)
    return LossSettings(kind, huber_c=c).per_sample(r, torch.zeros_like(r), torch.tensor([0.5])).item()


@pytest.mark.parametrize("kind", ["huber", "pseudo_huber"])
def test_huber_is_mse_for_small_residuals_and_l1_like_for_large(kind):
    assert _residual_loss(kind, 0.01) == pytest.approx(_residual_loss("mse", 0.01), rel=0.01)
    big, bigger = _residual_loss(kind, 10.0), _residual_loss(kind, 20.0)
    assert (bigger - big) / 10 == pytest.approx(2 * 0.1, rel=0.01)  # slope 2c, like L1 scaled by 2c
    assert big < 0.05 * _residual_loss("mse", 10.0)


def test_an_outlier_pulls_huber_less_than_mse():
    target = torch.zeros(1, 100)
    target[0, 0] = 50.0  # one bad pixel
    grads = {}
    for kind in ("mse", "huber", "pseudo_huber", "l1"):
        pred = torch.zeros(1, 100, requires_grad=True)
        LossSettings(kind).per_sample(pred, target, torch.tensor([0.5])).sum().backward()
        grads[kind] = pred.grad[0, 0].abs().item()
    assert grads["huber"] == pytest.approx(2 * 0.1 / 100) and grads["pseudo_huber"] < 2 * 0.1 / 100 + 1e-9
    assert grads["mse"] == pytest.approx(2 * 50 / 100) and grads["l1"] == pytest.approx(1 / 100)


def test_huber_formulas():
    r = torch.tensor([0.05, 0.3])
    assert torch.allclose(huber(r, 0.1), torch.tensor([0.05**2, 2 * 0.1 * 0.3 - 0.1**2]))
    assert torch.allclose(pseudo_huber(r, 0.1), 2 * 0.1 * (torch.sqrt(r**2 + 0.01) - 0.1))


def test_loss_weightings_are_diffusers_sd3_schemes():
    pred, target, sigmas = torch.ones(2, 4), torch.zeros(2, 4), torch.tensor([0.5, 0.25])
    assert torch.allclose(LossSettings(weighting="sigma_sqrt").per_sample(pred, target, sigmas),
                          torch.tensor([4.0, 16.0]))  # 1/σ²
    cosmap = LossSettings(weighting="cosmap").per_sample(pred, target, sigmas)
    assert torch.allclose(cosmap, torch.tensor([2 / (math.pi * 0.5), 2 / (math.pi * (1 - 0.5 + 0.125))]))
    assert torch.equal(LossSettings().per_sample(pred, target, sigmas), torch.ones(2))


@pytest.mark.parametrize("settings, message", [
    ({"kind": "l3"}, "loss is 'l3'; choose one of mse"), ({"huber_c": 0.0}, "huber_c is 0.0"),
    ({"weighting": "snr"}, "loss_weighting is 'snr'")])
def test_bad_loss_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**settings)


def test_weighted_timesteps_refuse_a_second_weighting():
    from trainer.loop.flow import TimestepSampling

    with pytest.raises(ValueError, match="set loss_weighting to none"):
        TrainConfig(timesteps=TimestepSampling("weighted"), loss=LossSettings(weighting="cosmap"))


def test_the_trainer_trains_on_the_chosen_loss(tiny_flux):
    from pathlib import Path

    from trainer.data import datasets
    from trainer.data.encode import encode_dataset
    from trainer.data.images import Shaping
    from trainer.loop.trainer import train
    from trainer.lora.targets import LayerSpec
    from trainer.lora.weights import LoraSet

    folder = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    examples = encode_dataset(datasets.from_folder(folder, options), tiny_flux)[0][:1]
    backend = tiny_flux.backend()

    def first_loss(**loss):
        lora = LoraSet(LayerSpec.preset("attention", backend.dims, rank=4).targets(backend.dims), seed=1)
        return train(backend, lora, examples, TrainConfig(steps=1, seed=3, loss=LossSettings(**loss))).losses[0]

    mse = first_loss()
    assert first_loss(kind="pseudo_huber", huber_c=1e3) == pytest.approx(mse, rel=1e-4)  # huge c: MSE
    assert first_loss(kind="l1") != pytest.approx(mse, rel=0.05)
    assert first_loss(weighting="sigma_sqrt") > mse  # σ < 1: weights above 1
