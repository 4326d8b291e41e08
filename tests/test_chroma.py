"""Chroma without ComfyUI: diffusers' ChromaTransformer2DModel at toy width trains (the
fixed-noise loss falls), memory modes compute what the plain path computes, checkpoints and LoRA
files record the family, and Chroma's names are FLUX.1's without the modulation layers. (On
ComfyUI's own Chroma, and against it: tests/test_host_chroma.py.)"""

from dataclasses import astuple

import pytest
import torch

from trainer import families
from trainer.cli.weights import TRANSFORMER, kind_of
from trainer.data.encode import Example
from trainer.families.chroma.diffusers import DiffusersChroma
from trainer.families.conditioning import Conditioning
from trainer.families.flux1.layers import VOCABULARY as FLUX1
from trainer.families.flux1.layers import FluxDims
from trainer.loop import flow
from trainer.loop.config import TrainConfig
from trainer.loop.memory import MemoryConfig
from trainer.loop.trainer import fixed_noise_loss, train
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs.export import LoraMetadata


@pytest.fixture(scope="module")
def backend():
    from diffusers import ChromaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ChromaTransformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=128,
                                         num_attention_heads=2, joint_attention_dim=64, approximator_hidden_dim=64,
                                         approximator_layers=2)
    return DiffusersChroma(model.eval())


def test_chroma_is_a_family_with_flux1s_names_less_the_modulation(backend):
    chroma = families.family("chroma")
    assert backend.family is chroma and families.of_layout(backend.dims) is chroma
    assert (chroma.latent_channels, chroma.patch_size, chroma.pooled) == (16, 2, False)
    for group, layers in FLUX1.layers.items():
        assert set(layers) - set(chroma.vocabulary.layers[group]) == ({"norm.linear"} if group != "transformer_blocks"
                                                                      else {"norm1.linear", "norm1_context.linear"})
    flux1_dims = FluxDims(*astuple(backend.dims))
    for preset in ("attention", "attention+mlp"):  # the same rows of the same BFL layers as FLUX.1's
        ours = LayerSpec.preset(preset, backend.dims, rank=4).targets(backend.dims)
        theirs = LayerSpec.preset(preset, flux1_dims, rank=4).targets(flux1_dims)
        assert [(t.bfl_module, t.rows) for t in ours] == [(t.bfl_module, t.rows) for t in theirs]
    with pytest.raises(ValueError, match="norm1.linear"):
        LayerSpec((LayerGroup("transformer_blocks", 0, 2, ("norm1.linear",), 4),)).targets(backend.dims)
    meta = LoraMetadata(LayerSpec.preset("attention", backend.dims, rank=4), family="chroma",
                        variant=backend.variant).header(10)
    assert (meta["dreambooth.family"], meta["modelspec.architecture"]) == ("chroma", "chroma/lora")
    bfl = {"distilled_guidance_layer.in_proj.weight": (5120, 64), "img_in.weight": (3072, 64),
           "double_blocks.0.img_attn.qkv.weight": (9216, 3072)}
    assert kind_of(bfl) != TRANSFORMER and "train Chroma in ComfyUI" in kind_of(bfl)
    with pytest.raises(ValueError, match="pooled"):
        backend.velocity(torch.randn(1, 16, 4, 4), torch.tensor([0.5]),
                         Conditioning(torch.randn(1, 7, 64), torch.randn(1, 64)))


def test_tiny_chroma_trains(backend):
    assert backend.variant == "" and backend.dims.mlp_hidden == 4 * backend.dims.hidden_size
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, 1, 1, generator=g)  # something in common to learn, as photos have
    examples = [Example(shared + 0.3 * torch.randn(16, 8, 8, generator=g), torch.randn(7, 64, generator=g), None,
                        f"photo {i}") for i in range(2)]
    lora = LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=4).targets(backend.dims), seed=0)
    config = TrainConfig(steps=20, learning_rate=1e-2, seed=0,
                         timesteps=flow.TimestepSampling(backend.family.timestep_sampling))
    before = fixed_noise_loss(backend, lora, examples, 0.0)
    train(backend, lora, examples, config)
    assert fixed_noise_loss(backend, lora, examples, 0.0) <= 0.8 * before


def test_chroma_memory_modes_match_the_plain_path(backend):
    spec = LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    torch.manual_seed(3)
    lat, noise, sig = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8])
    cond = Conditioning(torch.randn(2, 7, 64), None, 0.0)

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
    assert all(g.abs().max() > 0 for g in plain)
    for memory in (MemoryConfig("blocks"), MemoryConfig("offload", swap_blocks=2)):
        for g, r in zip(grads(memory), plain):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max(), memory
