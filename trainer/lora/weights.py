"""LoRA weights and how they join a frozen model.

Each target gets a pair (down A: r×in, up B: rows×r) and adds s·B(A·x) to its layer's output,
computed on activations: the frozen weight W is never rebuilt as W + s·B·A, so autograd never
forms a full-size weight gradient and no weight is copied per call.

When several targets share one fused Linear (ComfyUI's q/k/v), their downs are stacked into one
matmul and each up adds into its own slice of that layer's output; rows nobody trains cost nothing.
The other variants (DoRA, LoKr, LoHa: variants.py) add their own update into their slice.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .targets import TRANSFORMER, LoraTarget
from .variants import LoraWeight, describe, make_weight

LORA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoraSet(nn.Module):
    """Every LoRA of a run, keyed by diffusers name."""

    def __init__(self, targets: list[LoraTarget], dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weights = nn.ModuleDict({_key(t.name): make_weight(t, dtype, generator) for t in targets})
        self._switch = [1.0]  # the LoRA's multiplier, shared with its parts: 0 = its hooks add nothing

    @contextmanager
    def disabled(self):
        """While inside, the model computes as if this LoRA weren't there: the frozen model's own
        prediction (differential output preservation's target) without a second copy of the model."""
        with self.multiplied(0.0):
            yield

    @contextmanager
    def multiplied(self, multiplier: float):
        """While inside, every hook adds `multiplier` × its update (ai-toolkit's per-dataset
        network_weight): 1 as trained, 0 the frozen model, 0.5 half the LoRA."""
        was, self._switch[0] = self._switch[0], float(multiplier)
        try:
            yield
        finally:
            self._switch[0] = was

    @property
    def enabled(self) -> bool:
        return self._switch[0] != 0.0

    @property
    def multiplier(self) -> float:
        return self._switch[0]

    def __iter__(self):
        return iter(self.weights.values())

    def __len__(self):
        return len(self.weights)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters an optimizer steps (and an EMA averages), in a fixed order."""
        return [p for p in self.parameters() if p.requires_grad]

    def copy_from(self, values: list[torch.Tensor]) -> "LoraSet":
        """Set the trainable parameters to `values` (e.g. an EMA), in `trainable()` order."""
        with torch.no_grad():
            for p, v in zip(self.trainable(), values, strict=True):
                p.copy_(v)
        return self

    def variants(self) -> dict[str, str]:
        """What each target trains (variants.describe), by diffusers name: a resumed run must match."""
        return {w.target.name: describe(w.target) for w in self}
    def part(self, *components: str) -> "LoraSet":
        """The weights of these components ('transformer', 'clip_l', …): the same modules, not copies."""
        part = LoraSet([])
        part._switch = self._switch  # disabling the whole set disables the hooks its parts attached
        part.weights = nn.ModuleDict({k: w for k, w in self.weights.items() if w.target.component in components})
        return part

    def transformer(self) -> "LoraSet":
        """The transformer's weights (what a backend attaches to the model)."""
        return self.part(TRANSFORMER)

    def components(self) -> list[str]:
        """The components with weights, in the order they were added (the transformer first)."""
        return list(dict.fromkeys(w.target.component for w in self))

    def get(self, name: str) -> LoraWeight:
        return self.weights[_key(name)]

    def by_module(self) -> dict[str, list[LoraWeight]]:
        """Weights grouped by BFL module, ordered by output rows."""
        groups: dict[str, list[LoraWeight]] = defaultdict(list)
        for w in self:
            groups[w.target.bfl_module].append(w)
        return {m: sorted(ws, key=lambda w: w.rows) for m, ws in groups.items()}


def _key(name: str) -> str:
    return name.replace(".", "__")


def add_lora(x: torch.Tensor, output: torch.Tensor, weights: list[LoraWeight], whole: bool = False) -> torch.Tensor:
    """output + Σ s·B(A·x) of the weights sharing one layer, each added into its own output rows
    (one stacked down-projection; nothing is computed for rows no weight trains). `whole`: the
    layer is exactly one weight's rows (diffusers' unfused layers). The weights come to the layer's
    device and dtype (a text encoder may compute elsewhere than the transformer)."""
    cast = {"device": x.device, "dtype": x.dtype}
    if whole or (len(weights) == 1 and weights[0].target.whole):
        w = weights[0]
        return output + F.linear(F.linear(x, w.down.to(**cast)), (w.up * w.scale).to(**cast)).to(output.dtype)
    down = F.linear(x, torch.cat([w.down for w in weights]).to(**cast))
    col = 0
    for w in weights:
        r = w.target.rank
        start, stop = w.rows
        output[..., start:stop] += F.linear(down[..., col:col + r], (w.up * w.scale).to(**cast)).to(output.dtype)
        col += r
    return output


def fused_up(weights: list[LoraWeight], scale_by: list[float] | None = None) -> torch.Tensor:
    """The (out_features × Σr) up matrix of a fused layer: each B, times its scale (or
    `scale_by[i]`), in its rows and its own rank columns; zeros elsewhere."""
    out_features = weights[0].target.out_features
    scales = scale_by if scale_by is not None else [w.scale for w in weights]
    total_rank = sum(w.target.rank for w in weights)
    blocks, row, col = [], 0, 0
    for w, scale in zip(weights, scales):
        start, stop = w.rows
        if start > row:
            blocks.append(w.up.new_zeros(start - row, total_rank))
        r = w.target.rank
        blocks.append(F.pad(w.up * scale, (col, total_rank - col - r)))
        row, col = stop, col + r
    if row < out_features:
        blocks.append(weights[0].up.new_zeros(out_features - row, total_rank))
    return torch.cat(blocks)


class _LoraHook:
    def __init__(self, lora: LoraSet, weights: list[LoraWeight], whole: bool):
        self.lora = lora
        self.plain = [w for w in weights if w.variant == "lora"]
        self.others = [w for w in weights if w.variant != "lora"]
        self.whole = whole

    def __call__(self, module, args, output):
        multiplier = self.lora.multiplier
        if multiplier == 0.0:
            return output
        frozen = output.clone() if multiplier != 1.0 else None  # the updates may add into `output` in place
        x = args[0]
        if self.plain:
            output = add_lora(x, output, self.plain, self.whole)
        for w in self.others:  # each into its own rows; DoRA reads the frozen output of its rows first
            output = w.add_to(x, output, module, self.whole)
        return output if frozen is None else frozen + multiplier * (output - frozen)


def attach(lora: LoraSet, layer_of: Callable[[LoraWeight], nn.Module], split: bool) -> list:
    """Hook every weight into its layer and return the handles. With `split` (diffusers) each
    target is a layer of its own unless `layer_of` gives several the same fused layer; otherwise
    (BFL) the targets of a fused layer share one hook."""
    handles = []
    try:
        for weights in lora.by_module().values():
            groups = [weights]
            if split:  # one layer per target, except where diffusers fuses too (FLUX.2's single blocks)
                by_layer: dict[int, list[LoraWeight]] = {}
                for w in weights:
                    by_layer.setdefault(id(layer_of(w)), []).append(w)
                groups = list(by_layer.values())
            for group in groups:
                layer = layer_of(group[0])
                t = group[0].target
                whole = split and layer.out_features == t.rows[1] - t.rows[0]
                expected = (t.in_features, t.rows[1] - t.rows[0] if whole else t.out_features)
                if (layer.in_features, layer.out_features) != expected:
                    raise ValueError(f"{t.name} expects a {expected[0]}→{expected[1]} layer but the model's is "
                                     f"{layer.in_features}→{layer.out_features}: the model is not FLUX.1-shaped "
                                     f"(its {t.component}).")
                handles.append(layer.register_forward_hook(_LoraHook(lora, group, whole=whole)))
    except BaseException:
        detach_all(handles)
        raise
    return handles


def detach_all(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
