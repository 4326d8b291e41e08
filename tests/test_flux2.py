"""FLUX.2 without ComfyUI: diffusers' Flux2Transformer2DModel at toy width trains (the fixed-noise
loss falls), and every memory mode computes what the plain path computes. (On ComfyUI's own
FLUX.2, and against it: tests/test_host_flux2.py.)"""

import pytest
import torch

from trainer.data.encode import Example
from trainer.families.conditioning import Conditioning
from trainer.families.flux2.diffusers import DiffusersFlux2
from trainer.loop import flow
from trainer.loop.config import TrainConfig
from trainer.loop.memory import MemoryConfig
from trainer.loop.trainer import fixed_noise_loss, train
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet


@pytest.fixture(scope="module")
def backend():
    from diffusers import Flux2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Flux2Transformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=128,
                                        num_attention_heads=2, joint_attention_dim=64, guidance_embeds=False)
    return DiffusersFlux2(model.eval())


def test_tiny_flux2_trains(backend):
    assert backend.variant == "klein" and backend.dims.mlp_hidden == 3 * backend.dims.hidden_size
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(128, 1, 1, generator=g)  # something in common to learn, as photos have
    examples = [Example(shared + 0.3 * torch.randn(128, 4, 4, generator=g), torch.randn(7, 64, generator=g), None,
                        f"photo {i}") for i in range(2)]
    lora = LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=4).targets(backend.dims), seed=0)
    config = TrainConfig(steps=20, learning_rate=1e-2, seed=0, timesteps=flow.TimestepSampling("flux2_shift"))
    before = fixed_noise_loss(backend, lora, examples)
    train(backend, lora, examples, config)
    assert fixed_noise_loss(backend, lora, examples) <= 0.8 * before


def test_flux2_memory_modes_match_the_plain_path(backend):
    spec = LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    torch.manual_seed(3)
    lat, noise, sig = torch.randn(2, 128, 4, 4), torch.randn(2, 128, 4, 4), torch.tensor([0.3, 0.8])
    cond = Conditioning(torch.randn(2, 7, 64))

    def grads(memory):
        lora = LoraSet(spec.targets(backend.dims), seed=5)
        with torch.no_grad():
            for i, w in enumerate(lora):
                w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        with backend.training(lora, memory):
            v = backend.velocity(flow.noisy_latents(lat, noise, sig), sig, cond)
            flow.flow_matching_loss(v, flow.velocity_target(lat, noise)).mean().backward()
        return [p.grad for p in lora.parameters()]

    plain = grads(MemoryConfig("off"))
    for memory in (MemoryConfig("blocks"), MemoryConfig("offload", swap_blocks=2)):
        for g, r in zip(grads(memory), plain):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max(), memory
