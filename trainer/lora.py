"""LoRA weights and how they join a frozen model.

Each target gets a pair (down A: r×in, up B: rows×r) and adds s·B(A·x) to its layer's output,
computed on activations: the frozen weight W is never rebuilt as W + s·B·A, so autograd never
forms a full-size weight gradient and no weight is copied per call.

When several targets share one fused Linear (ComfyUI's q/k/v), their downs are stacked and their
ups placed block-diagonally in that layer's output rows: one extra matmul pair per layer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoraTarget

LORA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoraWeight(nn.Module):
    """The trainable pair of one target. `rows` is its slice of the layer's output."""

    def __init__(self, target: LoraTarget, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.target = target
        self.rows = target.rows
        bound = 1.0 / math.sqrt(target.in_features)  # nn.Linear's default (kaiming-uniform, a=√5)
        down = (torch.rand(target.rank, target.in_features, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down.to(dtype))
        self.up = nn.Parameter(torch.zeros(self.rows[1] - self.rows[0], target.rank, dtype=dtype))

    @property
    def scale(self) -> float:
        return self.target.scale


class LoraSet(nn.Module):
    """Every LoRA of a run, keyed by diffusers name."""

    def __init__(self, targets: list[LoraTarget], dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weights = nn.ModuleDict({_key(t.name): LoraWeight(t, dtype, generator) for t in targets})

    def __iter__(self):
        return iter(self.weights.values())

    def __len__(self):
        return len(self.weights)

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


def lora_delta(x: torch.Tensor, weights: list[LoraWeight]) -> torch.Tensor:
    """Σ s·B(A·x) of the weights sharing one layer, each in its output rows."""
    if len(weights) == 1 and weights[0].rows == (0, weights[0].target.out_features):
        w = weights[0]
        return F.linear(F.linear(x, w.down.to(x.dtype)), (w.up * w.scale).to(x.dtype))
    down = torch.cat([w.down for w in weights]).to(x.dtype)
    return F.linear(F.linear(x, down), fused_up(weights).to(x.dtype))


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
    def __init__(self, weights: list[LoraWeight], split: bool):
        self.weights, self.split = weights, split

    def __call__(self, module, args, output):
        x = args[0]
        if self.split:  # a layer of its own (diffusers): its whole output belongs to the one weight
            w = self.weights[0]
            delta = F.linear(F.linear(x, w.down.to(x.dtype)), (w.up * w.scale).to(x.dtype))
        else:
            delta = lora_delta(x, self.weights)
        return output + delta.to(output.dtype)


def attach(lora: LoraSet, layer_of: Callable[[LoraWeight], nn.Module], split: bool) -> list:
    """Hook every weight into its layer and return the handles. With `split` (diffusers) each
    target is a layer of its own; otherwise (BFL) the targets of a fused layer share one hook."""
    handles = []
    for weights in lora.by_module().values():
        groups = [[w] for w in weights] if split else [weights]
        for group in groups:
            layer = layer_of(group[0])
            expected = (group[0].target.in_features,
                        group[0].rows[1] - group[0].rows[0] if split else group[0].target.out_features)
            if (layer.in_features, layer.out_features) != expected:
                raise ValueError(f"{group[0].target.name} expects a {expected[0]}→{expected[1]} layer but the model's "
                                 f"is {layer.in_features}→{layer.out_features}: the model is not FLUX.1-shaped.")
            handles.append(layer.register_forward_hook(_LoraHook(group, split)))
    return handles


def detach_all(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
