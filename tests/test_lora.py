import pytest
import torch
from torch import nn

from trainer.families.flux1.layers import DOUBLE, SINGLE, FluxDims
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.lora.weights import LoraSet, attach, detach_all

DIMS = FluxDims(hidden_size=32, mlp_hidden=128, double_blocks=1, single_blocks=1)


def _lora(groups, seed=0):
    lora = LoraSet(LayerSpec(groups).targets(DIMS), seed=seed)
    with torch.no_grad():
        for i, w in enumerate(lora):  # trained-looking ups, so every delta is non-zero
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)))
    return lora


def _linear(in_f, out_f):
    layer = nn.Linear(in_f, out_f).requires_grad_(False)
    torch.nn.init.normal_(layer.weight)
    return layer


def test_fused_lora_equals_the_merged_weight_it_stands_for():
    # single block linear1 = q|k|v|mlp; two groups of different rank and alpha share it
    lora = _lora((LayerGroup(SINGLE, 0, 1, ("attn.to_q", "attn.to_v"), 4, 2.0),
                  LayerGroup(SINGLE, 0, 1, ("proj_mlp",), 6, 12.0)))
    layer = _linear(32, 3 * 32 + 128)
    x = torch.randn(2, 5, 32)
    merged = layer.weight.clone()
    for w in lora:
        a, b = w.rows
        merged[a:b] += w.scale * w.up @ w.down
    handles = attach(lora, lambda w: layer, split=False)
    try:
        y = layer(x)
    finally:
        detach_all(handles)
    assert torch.allclose(y, torch.nn.functional.linear(x, merged, layer.bias), atol=1e-5)
    assert len(layer._forward_hooks) == 0


def test_a_slice_changes_only_its_rows():
    lora = _lora((LayerGroup(DOUBLE, 0, 1, ("attn.to_k",), 4),))
    layer = _linear(32, 96)
    x = torch.randn(3, 32)
    base = layer(x)
    handles = attach(lora, lambda w: layer, split=False)
    y = layer(x)
    detach_all(handles)
    assert torch.equal(y[:, :32], base[:, :32]) and torch.equal(y[:, 64:], base[:, 64:])
    assert not torch.allclose(y[:, 32:64], base[:, 32:64])


def test_lora_is_computed_on_activations_not_on_a_merged_weight():
    """Backward must never hold a new out×in tensor: no W + s·B·A copy and no full-size weight
    gradient. Every saved tensor of the weight's shape must be the frozen weight itself."""
    lora = _lora((LayerGroup(DOUBLE, 0, 1, ("attn.to_q", "attn.to_k", "attn.to_v"), 4),))
    layer = _linear(32, 96)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    handles = attach(lora, lambda w: layer, split=False)
    x = torch.randn(4, 32, requires_grad=True)  # as inside a model: activations carry gradients
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = layer(x).square().sum()
    loss.backward()
    detach_all(handles)
    full = [t for t in saved if tuple(t.shape) in ((96, 32), (32, 96))]
    assert full and all(t.data_ptr() == layer.weight.data_ptr() for t in full)
    assert layer.weight.grad is None and x.grad is not None
    assert all(w.down.grad is not None and w.up.grad is not None for w in lora)


def test_split_layers_get_one_lora_each():
    lora = _lora((LayerGroup(DOUBLE, 0, 1, ("attn.to_q", "attn.to_k"), 4),))
    layers = {"transformer_blocks.0.attn.to_q": _linear(32, 32), "transformer_blocks.0.attn.to_k": _linear(32, 32)}
    x = torch.randn(2, 32)
    base = {k: m(x) for k, m in layers.items()}
    handles = attach(lora, lambda w: layers[w.target.name], split=True)
    for name, layer in layers.items():
        w = lora.get(name)
        assert torch.allclose(layer(x), base[name] + w.scale * x @ w.down.T @ w.up.T, atol=1e-5)
    detach_all(handles)


def test_init_is_seeded_and_starts_as_a_no_op():
    targets = LayerSpec((LayerGroup(SINGLE, 0, 1, ("proj_out",), 8),)).targets(DIMS)
    a, b, c = LoraSet(targets, seed=1), LoraSet(targets, seed=1), LoraSet(targets, seed=2)
    wa, wb, wc = next(iter(a)), next(iter(b)), next(iter(c))
    assert torch.equal(wa.down, wb.down) and not torch.equal(wa.down, wc.down)
    assert torch.count_nonzero(wa.up) == 0
    assert wa.down.abs().max() <= 1 / (32 + 128) ** 0.5


def test_wrong_model_shape_is_a_clear_error_and_leaves_no_hooks():
    lora = _lora((LayerGroup(DOUBLE, 0, 1, ("attn.to_q",), 4), LayerGroup(SINGLE, 0, 1, ("proj_out",), 4)))
    good, bad = _linear(32, 96), _linear(64, 64)
    with pytest.raises(ValueError, match="single_transformer_blocks.0.proj_out.*not FLUX.1-shaped"):
        attach(lora, lambda w: good if w.target.name.startswith("transformer_blocks") else bad, split=False)
    assert not good._forward_hooks and not bad._forward_hooks
