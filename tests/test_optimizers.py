"""Each optimizer trains the tiny FLUX, resumes bit for bit, and is the library's own; the LR
schedules are diffusers' values; gradient accumulation runs its batches."""

import importlib
import io
import math
from pathlib import Path

import pytest
import torch

from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.loop import optimizers
from trainer.loop.trainer import TrainConfig, Trainer, fixed_noise_loss
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs import checkpoints, export

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"

# name, learning rate, the class it must be (module, name), a state key only that optimizer keeps
OPTIMIZER_CASES = [
    ("adamw", 5e-3, ("torch.optim", "AdamW"), "exp_avg"),
    ("adamw8bit", 5e-3, ("bitsandbytes.optim", "AdamW8bit"), "state1"),
    ("adafactor", 5e-3, ("transformers.optimization", "Adafactor"), "exp_avg_sq_row"),
    ("prodigy", 1.0, ("prodigyopt", "Prodigy"), "s"),
    ("lion", 1e-3, ("lion_pytorch", "Lion"), "exp_avg"),
    ("adamw_schedulefree", 5e-3, ("schedulefree", "AdamWScheduleFree"), "z"),
]


@pytest.fixture(scope="module")
def examples(tiny_flux):
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0][:2]


def _lora(backend):
    return LoraSet(LayerSpec.preset("attention", backend.dims, rank=4).targets(backend.dims), seed=1)


def _trainer(tiny_flux, examples, **overrides):
    backend = tiny_flux.backend()
    config = TrainConfig(**{"steps": 4, "learning_rate": 1e-3, "seed": 5, "weight_decay": 0.01, **overrides})
    return Trainer(backend, _lora(backend), examples, config)


def _through_a_file(state: dict) -> dict:
    """As a checkpoint carries it: saved and loaded back without pickled code."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _needs(module: str):
    try:
        importlib.import_module(module)
    except Exception as e:
        pytest.skip(f"{module} is not installed here ({type(e).__name__}); `pip install "
                    f"{module.split('.')[0]}` to test it")


@pytest.mark.parametrize("name, lr, cls, state_key", OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_each_optimizer_trains_and_resumes_bit_for_bit(tiny_flux, examples, name, lr, cls, state_key):
    _needs(cls[0])
    straight = _trainer(tiny_flux, examples, optimizer=name, learning_rate=lr)
    assert type(straight.optimizer) is getattr(importlib.import_module(cls[0]), cls[1])
    before = fixed_noise_loss(straight.backend, straight.result_lora(), examples, sigmas=(0.3, 0.6))
    straight.run()
    after = fixed_noise_loss(straight.backend, straight.result_lora(), examples, sigmas=(0.3, 0.6))
    assert after < before, (name, before, after)
    assert any(state_key in s for s in straight.optimizer.state.values()), list(straight.optimizer.state.values())[0]

    first = _trainer(tiny_flux, examples, optimizer=name, learning_rate=lr)
    first.run(until=2)
    second = _trainer(tiny_flux, examples, optimizer=name, learning_rate=lr)
    second.load_state(_through_a_file(first.state()))
    second.run()
    assert second.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(second.lora.parameters(), straight.lora.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(second.result_lora().parameters(),
                                                 straight.result_lora().parameters()))


def test_schedule_free_saves_its_average_and_keeps_training_weights_exact(tiny_flux, examples, tmp_path):
    trainer = _trainer(tiny_flux, examples, optimizer="adamw_schedulefree", learning_rate=5e-3, steps=3)
    trainer.run()
    training = [p.detach().clone() for p in trainer.params]
    averaged = trainer.result_lora()  # switches to eval mode and back
    assert all(torch.equal(p, t) for p, t in zip(trainer.params, training))
    assert all(group["train_mode"] for group in trainer.optimizer.param_groups)
    assert any(not torch.equal(a, t) for a, t in zip(averaged.trainable(), training))
    # the checkpoint's file and its state both give the average, not the weights it steps
    spec = LayerSpec.preset("attention", trainer.backend.dims, rank=4)
    state = {**trainer.state(), **checkpoints.describe(spec, trainer.backend.dims)}
    path = checkpoints.RunFolder(tmp_path).save(trainer.step, export.kohya_state_dict(averaged), {}, state)
    loaded = checkpoints.load_trained_lora(path).lora
    assert all(torch.equal(a, b) for a, b in zip(loaded.trainable(), averaged.trainable()))


def test_a_missing_optimizer_package_names_the_install_command(monkeypatch):
    real = importlib.import_module

    def no_bitsandbytes(name, *args):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_bitsandbytes)
    with pytest.raises(RuntimeError, match=r"adamw8bit.*`pip install bitsandbytes`.*adamw"):
        TrainConfig(optimizer="adamw8bit")


def test_an_optimizer_that_imports_but_cannot_step_is_refused_by_name(monkeypatch):
    class Broken(torch.optim.AdamW):
        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(optimizers, "constructor", lambda name: Broken)
    with pytest.raises(RuntimeError, match=r"'adamw8bit' imports but does not run on cpu.*pip install -U bitsandbytes"):
        optimizers.build("adamw8bit", [torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0)


def test_other_tools_spellings_and_optimizer_args():
    assert optimizers.canonical("AdamW8bit") == optimizers.canonical("bnb-adamw8bit") == "adamw8bit"
    assert TrainConfig(optimizer="Prodigy").optimizer == "prodigy"  # TrainConfig keeps our spelling
    assert optimizers.parse_args("betas=0.9,0.99 eps=1e-8 decouple=True") == {
        "betas": (0.9, 0.99), "eps": 1e-8, "decouple": True}
    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    built = optimizers.build("adamw", params, 1e-3, 0.0, {"betas": (0.8, 0.9)})
    assert built.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"optimizer_args has 'beta3', which AdamW does not take"):
        TrainConfig(optimizer_args={"beta3": 0.5})
    with pytest.raises(ValueError, match="key=value"):
        optimizers.parse_args("betas")


def test_gradient_accumulation_runs_its_batches_per_step(tiny_flux, examples):
    trainer = _trainer(tiny_flux, examples, steps=2, gradient_accumulation_steps=3)
    calls = []
    velocity = trainer.backend.velocity
    trainer.backend.velocity = lambda *args: calls.append(1) or velocity(*args)
    trainer.run()
    assert len(calls) == 6 and trainer.step == 2
    single = _trainer(tiny_flux, examples, steps=2)
    single.run()
    # a mean over the batches, not a sum: the same scale as one batch's loss
    assert 0.5 < trainer.losses[0] / single.losses[0] < 2.0


SCHEDULE_CASES = [  # name, extra settings, step → hand-computed factor (steps=100, warmup 10)
    ("constant", {}, {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),  # with warmup, as before: constant_with_warmup
    ("constant_with_warmup", {}, {5: 0.5, 50: 1.0}),
    ("linear", {}, {5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
    ("cosine", {}, {10: 1.0, 55: 0.5, 100: 0.0}),
    ("cosine_with_restarts", {"lr_num_cycles": 2},
     {10: 1.0, 33: 0.5 * (1 + math.cos(math.pi * (2 * 23 / 90 % 1))), 55: 1.0, 100: 0.0}),
    ("polynomial", {"lr_power": 2.0, "lr_end": 1e-5}, {10: 1.0, 55: (0.9e-4 * 0.25 + 1e-5) / 1e-4, 100: 0.1}),
]


@pytest.mark.parametrize("name, extra, expected", SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
def test_schedules_have_their_hand_computed_values(name, extra, expected):
    config = TrainConfig(steps=100, learning_rate=1e-4, warmup_steps=10, lr_schedule=name, **extra)
    for step, factor in expected.items():
        assert config.lr_factor(step) == pytest.approx(factor, abs=1e-9), (name, step)


def test_restarts_restart():
    config = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine_with_restarts", lr_num_cycles=2)
    values = [config.lr_factor(k) for k in range(10, 100)]
    assert values[45] == pytest.approx(1.0) and values[44] < 0.01  # the second cycle starts at the top


def test_the_trainer_follows_the_schedule_and_resumes_it(tiny_flux, examples):
    overrides = dict(steps=4, warmup_steps=1, lr_schedule="polynomial", lr_power=2.0, lr_end=1e-5)
    trainer = _trainer(tiny_flux, examples, **overrides)
    seen = []
    trainer.run(until=2, on_step=lambda info: seen.append(info.lr))
    resumed = _trainer(tiny_flux, examples, **overrides)
    resumed.load_state(_through_a_file(trainer.state()))
    resumed.run(on_step=lambda info: seen.append(info.lr))
    expected = [1e-3 * trainer.config.lr_factor(k) for k in range(1, 5)]  # the rate after each step
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "sgdx"}, "optimizer is 'sgdx'; choose one of adamw"),
    ({"lr_schedule": "polynomial", "lr_end": 1e-3}, "lr_end is 0.001 with learning_rate 0.0001"),
    ({"optimizer": "adamw_schedulefree", "lr_schedule": "cosine"}, "set lr_schedule to constant"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps is 0"),
    ({"lr_num_cycles": 0}, "lr_num_cycles is 0"),
    ({"lr_power": 0.0}, "lr_power is 0.0"),
])
def test_bad_optimisation_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 100, **settings})
