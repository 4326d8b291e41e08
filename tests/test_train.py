import copy
from pathlib import Path

import pytest
import torch

from trainer.data import datasets
from trainer.data.encode import Example, encode_dataset
from trainer.data.images import Shaping
from trainer.families.conditioning import Conditioning
from trainer.loop.memory import MemoryConfig, compile_problem
from trainer.loop.trainer import TrainConfig, fixed_noise_loss, train
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


@pytest.fixture(scope="module")
def examples(tiny_flux):
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0]


def new_lora(backend, rank=8, seed=0, dtype=torch.float32):
    return LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=rank).targets(backend.dims), dtype, seed)


def test_fixed_noise_loss_falls_by_a_fifth(tiny_flux, examples):
    backend = tiny_flux.backend()
    lora = new_lora(backend)
    before = fixed_noise_loss(backend, lora, examples)
    result = train(backend, lora, examples, TrainConfig(steps=60, learning_rate=2e-3, seed=0))
    after = fixed_noise_loss(backend, lora, examples)
    assert result.steps_done == 60 and len(result.losses) == 60 and not result.stopped
    assert after < 0.8 * before, (before, after)


def _run(tiny_flux, examples, **overrides):
    backend = tiny_flux.backend()
    lora = new_lora(backend)
    config = TrainConfig(**{"steps": 6, "learning_rate": 1e-3, "seed": 7, **overrides})
    return train(backend, lora, examples, config), lora


def test_same_seed_same_lora_bit_for_bit(tiny_flux, examples):
    (r1, a), (r2, b) = _run(tiny_flux, examples), _run(tiny_flux, examples)
    assert r1.losses == r2.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    (r3, c) = _run(tiny_flux, examples, seed=8)
    assert r3.losses != r1.losses


MODES = [MemoryConfig("blocks"), MemoryConfig("blocks", checkpoint_every=3), MemoryConfig("offload"),
         MemoryConfig("blocks", swap_blocks=4), MemoryConfig("offload", swap_blocks=3)]


@pytest.mark.parametrize("memory", MODES, ids=MemoryConfig.describe)
def test_memory_modes_change_memory_not_results(tiny_flux, examples, memory):
    (r1, a), (r2, b) = _run(tiny_flux, examples, memory=memory), _run(tiny_flux, examples, memory=MemoryConfig("off"))
    assert r1.losses == pytest.approx(r2.losses, rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_checkpointing_more_blocks_keeps_fewer_activations(tiny_flux, examples):
    every, third, off = (_saved_bytes(tiny_flux, examples, MemoryConfig(c, checkpoint_every=k))
                         for c, k in (("blocks", 1), ("blocks", 3), ("off", 1)))
    assert every < 0.25 * off and every < third < off, (every, third, off)


def _saved_bytes(tiny_flux, examples, memory) -> int:
    """Bytes autograd keeps for backward after one forward (each storage counted once)."""
    backend = tiny_flux.backend()
    lora, storages = new_lora(backend), {}
    e = examples[0]

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with backend.training(lora, memory), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.velocity(e.latents[None], torch.tensor([0.5]), Conditioning.of([(e.context, e.pooled)])).sum()
    params = {p.untyped_storage().data_ptr() for p in tiny_flux.transformer.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_batches_mix_captions_of_different_lengths(tiny_flux, examples):
    mixed = examples[:2] + [Example(examples[2].latents, examples[2].context[:40], examples[2].pooled)]
    backend = tiny_flux.backend()
    result = train(backend, new_lora(backend), mixed, TrainConfig(steps=3, batch_size=3, seed=0))
    assert result.steps_done == 3 and all(loss > 0 for loss in result.losses)


def test_stop_request_ends_the_run_between_steps(tiny_flux, examples):
    backend = tiny_flux.backend()
    seen = []
    result = train(backend, new_lora(backend), examples, TrainConfig(steps=50), on_step=lambda i: seen.append(i.step),
                   should_stop=lambda: len(seen) >= 3)
    assert result.stopped and result.steps_done == 3 and seen == [1, 2, 3]


def test_nan_loss_stops_with_a_clear_message(tiny_flux, examples):
    backend = tiny_flux.backend()
    calls = []
    velocity = backend.velocity

    def poisoned(*args):
        calls.append(1)
        v = velocity(*args)
        return v * float("nan") if len(calls) == 3 else v

    backend.velocity = poisoned
    with pytest.raises(FloatingPointError, match="step 3.*learning_rate"):
        train(backend, new_lora(backend), examples, TrainConfig(steps=10))
    # the shared model is left as it was found: no LoRA hooks, no wrapped blocks
    assert not any(m._forward_hooks for m in tiny_flux.transformer.modules())
    assert not any("forward" in b.__dict__ for _, b, _ in backend.blocks())


def test_trains_on_bf16_weights_with_fp32_or_bf16_lora(tiny_flux, examples):
    model = copy.copy(tiny_flux)
    model.transformer = copy.deepcopy(tiny_flux.transformer).to(torch.bfloat16)
    backend = model.backend()
    assert backend.compute_dtype == torch.bfloat16
    for dtype in (torch.float32, torch.bfloat16):
        lora = new_lora(backend, dtype=dtype)
        start = [p.detach().clone() for p in lora.parameters()]
        result = train(backend, lora, examples, TrainConfig(steps=4, learning_rate=1e-3))
        assert all(torch.isfinite(torch.tensor(result.losses)))
        assert all(p.dtype == dtype for p in lora.parameters())
        assert any(not torch.equal(p, s) for p, s in zip(lora.parameters(), start))


def test_schedules_are_diffusers_warmup_then_decay():
    c = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine")
    assert c.lr_factor(0) == 0.0 and c.lr_factor(5) == pytest.approx(0.5)  # diffusers' warmup starts at 0
    assert c.lr_factor(10) == pytest.approx(1.0) and c.lr_factor(99) < 0.01
    assert TrainConfig(steps=10, lr_schedule="linear").lr_factor(5) == pytest.approx(0.5)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps is 0"), ("learning_rate", -1.0, "learning_rate"), ("batch_size", 0, "batch_size"),
    ("lr_schedule", "wild", "lr_schedule is 'wild'"), ("warmup_steps", 200, "warmup_steps is 200")])
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 100, field: value})


def test_compiled_blocks_train_the_same_lora():
    if compile_problem():
        pytest.skip(f"torch.compile does not work in this installation: {compile_problem()}")
    from trainer.families.flux1 import tiny
    from trainer.families.flux1.diffusers import DiffusersFlux

    model = tiny.build(0, double_blocks=1, single_blocks=1).transformer
    example = [Example(torch.randn(16, 8, 8), torch.randn(7, 64), torch.randn(64))]
    runs = []
    for compiled in (False, True):
        backend = DiffusersFlux(model)
        lora = new_lora(backend, rank=4)
        config = TrainConfig(steps=2, learning_rate=1e-3, memory=MemoryConfig("blocks", compile=compiled))
        runs.append((train(backend, lora, example, config).losses, list(lora.parameters())))
    (plain_losses, plain), (compiled_losses, compiled) = runs
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-5)
    # Adam normalises near-zero gradients, so float noise moves a weight by up to ~lr/10 per step
    assert all(torch.allclose(p, q, atol=1e-4) for p, q in zip(plain, compiled))
