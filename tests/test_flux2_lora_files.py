"""FLUX.2's LoRA layers and files without ComfyUI: the shared modulation layers (the group
"modulation") train, and the diffusers-format file loads into diffusers' Flux2Transformer2DModel
through Flux2KleinPipeline's own LoRA loading with every key consumed, computing what training
computed. (The kohya file in ComfyUI's stock LoraLoader: tests/test_host_flux2_modulation.py.)"""

import copy
import logging

import pytest
import torch

from trainer.families.conditioning import Conditioning
from trainer.families.flux2 import tiny
from trainer.families.flux2.diffusers import DiffusersFlux2
from trainer.loop.memory import MemoryConfig
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs import export

MODULATION = ("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
              "single_stream_modulation.linear")
SPEC = LayerSpec((
    LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "attn.to_out.0", "ff.linear_in", "attn.add_v_proj"), 4, 2.0),
    LayerGroup("single_transformer_blocks", 0, 2, ("attn.to_k", "proj_mlp", "attn.to_out"), 3),
    LayerGroup("modulation", 0, 1, MODULATION, 2, 4.0)))


@pytest.fixture(scope="module")
def transformer():
    return tiny.build(0).transformer


def _lora(backend, spec=SPEC, seed=0):
    lora = LoraSet(spec.targets(backend.dims), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in lora:
            w.up.copy_(torch.randn(w.up.shape, generator=g) * 0.05)
    return lora


def test_modulation_layers_are_named_as_diffusers_names_them_and_change_every_block(transformer):
    backend = DiffusersFlux2(transformer)
    targets = {t.name: t for t in SPEC.targets(backend.dims)}
    assert {n: (targets[n].bfl_module, targets[n].out_features) for n in MODULATION} == {
        "double_stream_modulation_img.linear": ("double_stream_modulation_img.lin", 6 * 256),
        "double_stream_modulation_txt.linear": ("double_stream_modulation_txt.lin", 6 * 256),
        "single_stream_modulation.linear": ("single_stream_modulation.lin", 3 * 256)}
    assert not any("modulation" in t.name for p in ("attention", "attention+mlp")
                   for t in LayerSpec.preset(p, backend.dims).targets(backend.dims))
    with pytest.raises(ValueError, match="block_range for modulation ends at 2, but this model has 1"):
        LayerSpec((LayerGroup("modulation", 0, 2, MODULATION[:1]),)).targets(backend.dims)
    only = LayerSpec((LayerGroup("modulation", 0, 1, MODULATION),))
    lora = _lora(backend, only)
    torch.manual_seed(1)
    lat, sig, cond = torch.randn(1, 128, 4, 4), torch.tensor([0.6]), Conditioning(torch.randn(1, 7, 96))
    with backend.training(lora, MemoryConfig("blocks")):  # outside the checkpointed blocks, as ComfyUI's
        v = backend.velocity(lat, sig, cond)
        (v - lat).square().mean().backward()
    assert all(w.down.grad.abs().max() > 0 for w in lora)


def test_diffusers_file_loads_in_flux2_pipelines_lora_loader_with_every_key(transformer, caplog):
    from diffusers import Flux2KleinPipeline
    from peft.tuners.lora import LoraLayer

    backend = DiffusersFlux2(transformer)
    lora = _lora(backend)
    sd = export.diffusers_state_dict(lora, family="flux2")
    assert not any(k.endswith(".alpha") for k in sd)  # Flux2LoraLoaderMixin refuses them
    modules = {k.rsplit(".lora_", 1)[0] for k in sd}
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in modules  # k and the MLP, one layer
    assert "transformer.double_stream_modulation_img.linear" in modules
    torch.manual_seed(2)
    lat, sig, cond = torch.randn(1, 128, 4, 4), torch.tensor([0.6]), Conditioning(torch.randn(1, 7, 96))
    with torch.no_grad():
        base = backend.velocity(lat, sig, cond)
        with backend.lora_applied(lora):
            trained = backend.velocity(lat, sig, cond)

    model = copy.deepcopy(transformer)
    with caplog.at_level(logging.WARNING):
        state = Flux2KleinPipeline.lora_state_dict(dict(sd))
        Flux2KleinPipeline.load_lora_into_transformer(state, transformer=model)
    assert "unexpected" not in caplog.text.lower() and "missing" not in caplog.text.lower(), caplog.text
    peft_layers = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {f"transformer.{n}" for n in peft_layers} == modules
    with torch.no_grad():
        loaded = DiffusersFlux2(model).velocity(lat, sig, cond)
    change, error = (trained - base).abs().max(), (loaded - trained).abs().max()
    assert change > 1e-3 and error < 1e-4 * change, (change, error)
