"""Quantized bases without ComfyUI: base_quantization int8 (torchao) on the tiny FLUX, the checks
around it, the copies of packed quantized weights (GGUF-style tensor subclasses) that training
makes, and the table that maps other tools' quantization settings to ours. The same paths inside
ComfyUI, with real GGUF files: tests/test_host_quant.py."""

import importlib.util

import pytest
import torch
from torch import nn

from trainer.families.conditioning import Conditioning
from trainer.families.flux1.comfy import _fresh_copy
from trainer.loop import flow, quantize
from trainer.loop.memory import BlockSwap, MemoryConfig
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet
from trainer.recipe import quantization
from trainer.recipe.schema import all_keys

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install torchao)")


def test_unknown_mode_and_missing_torchao_are_named(monkeypatch):
    with pytest.raises(ValueError, match="base_quantization is 'int4'; choose none, int8"):
        MemoryConfig(base_quantization="int4")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match="torchao, which is not installed: `pip install torchao`"):
        MemoryConfig(base_quantization="int8")
    assert MemoryConfig().base_quantization == "none"  # without torchao, none still works


def test_base_quantization_is_a_recipe_key():
    (key,) = [k for k in all_keys() if k.path == quantization.KEY]
    assert key.default == "none" and "int8" in key.help


def _step(backend, memory):
    torch.manual_seed(3)
    lat, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    ctx, pooled, sig = torch.randn(1, 7, 64), torch.randn(1, 64), torch.tensor([0.6])
    lora = LoraSet(LayerSpec.preset("attention+mlp", backend.dims, rank=4).targets(backend.dims), seed=5)
    with torch.no_grad():
        for i, w in enumerate(lora):
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    with backend.training(lora, memory):
        v = backend.velocity(flow.noisy_latents(lat, noise, sig), sig, Conditioning(ctx, pooled))
        loss = flow.flow_matching_loss(v, flow.velocity_target(lat, noise)).mean()
        loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in lora.parameters()])


@needs_torchao
def test_int8_base_trains_close_to_the_full_weights_and_restores_them(tiny_flux):
    backend = tiny_flux.backend()
    layer = tiny_flux.transformer.transformer_blocks[0].attn.to_q
    original, values = layer.weight, layer.weight.detach().clone()
    full_loss, full_grads = _step(backend, MemoryConfig("off"))
    with quantize.quantized_base(backend, "int8") as quantized:
        assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
        assert quantized.bytes_after < 0.3 * quantized.bytes_before  # fp32 weights: int8 plus row scales
        results = [_step(backend, m) for m in (MemoryConfig("off"), MemoryConfig("blocks"),
                                               MemoryConfig("offload", swap_blocks=3))]
        assert layer.weight.grad is None
    assert layer.weight is original and torch.equal(layer.weight, values) and "_int8" not in layer.__dict__
    assert _step(backend, MemoryConfig("off"))[0] == full_loss  # the model is as it was
    loss, grads = results[0]
    assert loss == pytest.approx(full_loss, rel=0.01)
    assert torch.nn.functional.cosine_similarity(grads, full_grads, dim=0) >= 0.999
    assert 0 < (grads - full_grads).norm() <= 0.05 * full_grads.norm()  # int8, not the full weights
    for other_loss, other_grads in results[1:]:
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert torch.allclose(other_grads, grads, rtol=1e-4, atol=1e-6)


@needs_torchao
def test_int8_refuses_weights_that_are_8_bit_already():
    layer = nn.Linear(64, 32).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"float8_e4m3fn already \(1 of the 1 layers, e.g. x.0\).*Set base_qu"):
        quantize.QuantizedBase({"x.0": layer}, torch.device("cpu"), torch.float32)
    assert layer.weight.dtype == torch.float8_e4m3fn


class Packed(torch.Tensor):
    """Like ComfyUI-GGUF's GGMLTensor: packed bytes, the unpacked shape as `shape`, a no-op clone."""

    def __new__(cls, data, tensor_type, tensor_shape):
        return super().__new__(cls, data)

    def __init__(self, data, tensor_type, tensor_shape):
        super().__init__()
        self.tensor_type, self.tensor_shape = tensor_type, tensor_shape

    def clone(self, *args, **kwargs):
        return self

    def detach(self, *args, **kwargs):
        return self

    @property
    def shape(self):
        return self.tensor_shape


def test_packed_weights_loaded_in_inference_mode_get_a_trainable_copy_with_their_attributes():
    with torch.inference_mode():
        weight = nn.Parameter(Packed(torch.arange(12, dtype=torch.uint8).view(2, 6), "Q8_0", torch.Size([2, 4])),
                              requires_grad=False)
    copy = _fresh_copy(weight)
    assert type(copy) is Packed and isinstance(copy, nn.Parameter) and not copy.is_inference()
    assert (copy.tensor_type, copy.shape, copy.size()) == ("Q8_0", torch.Size([2, 4]), torch.Size([2, 6]))
    assert torch.equal(copy.as_subclass(torch.Tensor), weight.as_subclass(torch.Tensor))
    x = torch.ones(3, requires_grad=True)
    (x * copy.as_subclass(torch.Tensor)[0, :3].float()).sum().backward()  # can be saved for backward


def test_block_swap_moves_packed_weights_by_their_bytes():
    block = nn.Linear(4, 2, bias=False)
    block.weight = nn.Parameter(Packed(torch.arange(12, dtype=torch.uint8).view(2, 6), "Q4_K", torch.Size([2, 4])),
                                requires_grad=False)
    swap = BlockSwap([block], [0], torch.device("cpu"))
    assert swap.on_host(block.weight) and block.weight.tensor_type == "Q4_K"
    swap.load(0)
    assert not swap.on_host(block.weight) and torch.equal(block.weight.as_subclass(torch.Tensor)[1],
                                                          torch.arange(6, 12, dtype=torch.uint8))
    swap.restore()
    assert block.weight.size() == (2, 6) and block.weight.shape == (2, 4)


@pytest.mark.parametrize("tool, key, value, ours, says", [
    ("mflux", "quantize", 8, "int8", "Q8_0"),
    ("mflux", "quantize", 4, "int8", "GGUF Q4_K file"),
    ("mflux", "quantize", 4.0, "int8", "Unet Loader (GGUF)"),
    ("mflux", "quantize", None, "none", ""),
    ("SimpleTuner", "base_model_precision", "int8-quanto", "int8", "optimum-quanto qint8"),
    ("SimpleTuner", "base_model_precision", "INT8-Torchao", "int8", ""),
    ("SimpleTuner", "base_model_precision", "no_change", "none", ""),
    ("SimpleTuner", "base_model_precision", "fp8-quanto", "none", "weight_dtype fp8_e4m3fn"),
    ("SimpleTuner", "base_model_precision", "nf4-bnb", "int8", "Q4_K"),
    ("ai-toolkit", "model.quantize", True, "none", "8-bit float"),
    ("ai-toolkit", "model.quantize", False, "none", ""),
])
def test_other_tools_quantization_settings_map_to_base_quantization(tool, key, value, ours, says):
    q = quantization.lookup(tool, key, value)
    assert q.value == ours and q.value in quantize.BASE_QUANTIZATIONS and says in q.note
    MemoryConfig(base_quantization="none")  # every value is one MemoryConfig takes (int8 needs torchao)


@pytest.mark.parametrize("tool, key, value", [("mflux", "quantize", 7), ("mflux", "quantize", True),
                                              ("SimpleTuner", "base_model_precision", "int8"),
                                              ("ai-toolkit", "model.quantize", 8)])
def test_unknown_quantization_values_are_not_guessed(tool, key, value):
    assert quantization.lookup(tool, key, value) is None
    assert "int8-quanto" in quantization.choices("SimpleTuner", "base_model_precision")
    assert quantization.choices("mflux", "quantize") == ["null", "8", "6", "5", "4", "3"]
