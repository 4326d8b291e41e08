"""What one LoRA target trains, and the update it adds to its layer's output rows.

Four variants, each a small class named as in its paper (and LyCORIS/peft, whose files use the
same names):

* lora (Hu et al.): down A (r×in), up B (rows×r); adds s·B(A·x). Fused layers stack the downs of
  their targets into one matmul (weights.add_lora).
* dora (Liu et al., DoRA): LoRA's pair and a magnitude m per output row. The rows become
  m ⊙ (W + s·BA) / n with n = ‖W + s·BA‖ per row, detached from the graph (the paper's §4.3, as
  peft does), added on activations as (m/n − 1)·(W·x) + (m/n)·s·B(A·x). n is read off the frozen
  layer itself: ‖W‖ per row once (its forward on unit rows), W·Aᵀ per call (its forward on A's r
  rows), so fp8 or cast weights, swapped or offloaded blocks work as the model computes them.
* lokr (LyCORIS LoKr): ΔW = s·(w1 ⊗ w2), w1 (a×c) and w2 (b×d) with a·b = rows, c·d = in from
  `factorization`; w2 = w2_a·w2_b of rank r unless lokr_full_rank (then s = 1, as LyCORIS).
  Applied on activations: x is cut into c groups of d, w2 acts inside each, w1 across them.
* loha (LyCORIS LoHa): ΔW = s·(w1_a·w1_b) ⊙ (w2_a·w2_b), a weight-shaped delta per call (rows×in,
  small at LoRA ranks); backward keeps only x and the four factors.

Each starts as a no-op, as LyCORIS and peft initialise: B, w2_b (or w2) and w2_a are zero.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .targets import LoraTarget

VARIANTS = ("lora", "dora", "lokr", "loha")
_EYE_CHUNK = 1024  # unit rows per forward when DoRA measures ‖W‖


def check_variant(variant: str, lokr_factor: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant is {variant!r}; choose {', '.join(VARIANTS)} (lora is the usual one).")
    if lokr_factor == 0 or lokr_factor < -1:
        raise ValueError(f"lokr_factor is {lokr_factor}; use -1 (automatic) or a factor of 1 or more (4–16).")


def describe(target: LoraTarget) -> str:
    """The variant with what shapes its weights: what a resumed run must match."""
    if target.variant == "lokr":
        return f"lokr (lokr_factor {target.lokr_factor}, lokr_full_rank {target.lokr_full_rank})"
    return target.variant


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension, as LyCORIS splits a LoKr side: m = `factor` when it divides,
    else (and for -1) the divisor pair closest to √dimension with m no larger than `factor`."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if new_m > limit:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a=√5): U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _add(output: torch.Tensor, delta: torch.Tensor, rows: tuple[int, int], whole: bool) -> torch.Tensor:
    """output with `delta` added to its `rows` (a fused layer's slice, in place) or to all of it."""
    if whole or rows == (0, output.shape[-1]):
        return output + delta.to(output.dtype)
    output[..., rows[0]:rows[1]] += delta.to(output.dtype)
    return output


class LoraWeight(nn.Module):
    """The trainable pair of one target. `rows` is its slice of the layer's output."""

    variant = "lora"

    def __init__(self, target: LoraTarget, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.target = target
        self.rows = target.rows
        self.down = nn.Parameter(_uniform((target.rank, target.in_features), target.in_features, generator).to(dtype))
        self.up = nn.Parameter(torch.zeros(self.out_rows, target.rank, dtype=dtype))

    @property
    def scale(self) -> float:
        return self.target.scale

    @property
    def out_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    def delta_weight(self) -> torch.Tensor:
        """The update of this target's rows of W (rows×in)."""
        return self.scale * self.up @ self.down

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up,
                "alpha": torch.tensor(self.scale * self.target.rank)}


@dataclass(frozen=True)
class _Frozen:
    """The layer a DoRA weight last ran in (held weakly), and the activations' device and dtype."""

    layer: weakref.ref
    whole: bool
    device: torch.device
    dtype: torch.dtype

    def forward(self, inputs: torch.Tensor, running: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's own forward (hooks skipped, no graph) on `inputs` and a zero row: (inputs·Wᵀ,
        bias), fp32, on `inputs`' device. `running`: inside the model's forward, where the layer
        computes on the activations' device; later (an export) its weight may have moved since
        (swapped or offloaded blocks): a layer that doesn't move its weight in runs where it is."""
        layer = self.layer()
        if layer is None:
            raise RuntimeError("The model this DoRA LoRA ran in is gone; export it while the model is loaded.")
        rows = torch.cat([inputs, inputs.new_zeros(1, inputs.shape[-1])])
        weight = getattr(layer, "weight", None)
        devices = [self.device]
        if not running and isinstance(weight, torch.Tensor) and not weight.is_meta and weight.device != self.device:
            devices.append(weight.device)
        with torch.no_grad():
            for i, device in enumerate(devices):
                try:
                    out = layer.forward(rows.to(device, self.dtype)).float().to(inputs.device)
                    break
                except RuntimeError:  # e.g. weights on the CPU, input on the GPU
                    if i == len(devices) - 1:
                        raise
        return out[:-1] - out[-1:], out[-1]


class DoraWeight(LoraWeight):
    variant = "dora"

    def __init__(self, target: LoraTarget, dtype: torch.dtype, generator: torch.Generator):
        super().__init__(target, dtype, generator)
        self.magnitude = nn.Parameter(torch.ones(self.out_rows, dtype=dtype))  # m: ‖W‖ per row at its first call
        self.register_buffer("weight_norm", torch.zeros(self.out_rows))  # ‖W‖ per row of the frozen weight
        self.ready = False  # weight_norm and magnitude measured (on the first call, or loaded)
        self._frozen: _Frozen | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._loaded())

    def _loaded(self) -> None:
        self.ready = bool(self.weight_norm.any())

    def _span(self, whole: bool) -> tuple[int, int]:
        return (0, self.out_rows) if whole else self.rows

    @torch.no_grad()
    def _measure(self) -> None:
        """‖W‖ of this target's rows, from the layer's forward on unit rows; m starts there."""
        frozen, (a, b) = self._frozen, self._span(self._frozen.whole)
        n_in = self.target.in_features
        total = torch.zeros(b - a, device=self.down.device)
        for start in range(0, n_in, _EYE_CHUNK):
            stop = min(n_in, start + _EYE_CHUNK)
            unit = torch.zeros(stop - start, n_in, device=self.down.device)
            unit[:, start:stop] = torch.eye(stop - start)
            columns, _ = frozen.forward(unit, running=True)  # W[:, start:stop]ᵀ
            total += columns[:, a:b].square().sum(0)
        self.weight_norm.copy_(total.sqrt())
        self.magnitude.copy_(self.weight_norm)
        self.ready = True

    @torch.no_grad()
    def norm_and_bias(self, running: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n = ‖W + s·BA‖ per row (detached, fp32) and the layer's bias on these rows:
        n² = ‖W‖² + 2s·⟨W_i, (BA)_i⟩ + s²·‖(BA)_i‖², with W·Aᵀ from the frozen layer."""
        if self._frozen is None or not self.ready:
            raise ValueError(f"The DoRA weights of {self.target.name} have not run through a model yet: ComfyUI's "
                             "dora_scale is relative to the base weights. Save it from the training run (the Train "
                             "node's lora output, or a checkpoint folder).")
        a, b = self._span(self._frozen.whole)
        down = self.down.detach().float()
        wa, bias = self._frozen.forward(down, running)  # (r × out): A·Wᵀ
        up = self.up.detach().float() * self.scale
        n2 = (self.weight_norm.square() + 2 * (up * wa[:, a:b].T).sum(1)
              + ((up @ (down @ down.T)) * up).sum(1))
        return n2.clamp_min(torch.finfo(torch.float32).tiny).sqrt(), bias[a:b]

    def add_to(self, x: torch.Tensor, output: torch.Tensor, layer: nn.Module, whole: bool) -> torch.Tensor:
        frozen = self._frozen
        if frozen is None or frozen.layer() is not layer or (frozen.whole, frozen.device, frozen.dtype) != (
                whole, x.device, x.dtype):
            self._frozen = _Frozen(weakref.ref(layer), whole, x.device, x.dtype)
        if not self.ready:
            self._measure()
        norm, bias = self.norm_and_bias(running=True)
        span = self._span(whole)
        ratio = (self.magnitude.float() / norm).to(output.dtype)  # m/n: the gradient reaches m, not n
        wx = output[..., span[0]:span[1]] - bias.to(output.dtype)
        lora = F.linear(F.linear(x, self.down.to(x.dtype)), (self.up * self.scale).to(x.dtype))
        return _add(output, (ratio - 1) * wx + ratio * lora.to(output.dtype), span, whole)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("DoRA's update depends on the base weights; see norm_and_bias().")

    def dora_scale(self) -> torch.Tensor:
        """What ComfyUI's loader wants as dora_scale (rows×1). Its weight_decompose, for a
        dora_scale of one value per output row, scales W + s·BA by dora_scale/‖W‖ (the norm of the
        weight *before* the update), so the file holds m·‖W‖/‖W + s·BA‖ to give m/n."""
        norm, _ = self.norm_and_bias()
        return (self.magnitude.detach().float() * self.weight_norm / norm)[:, None]

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().kohya_tensors(), "dora_scale": self.dora_scale()}


class LokrWeight(nn.Module):
    variant = "lokr"

    def __init__(self, target: LoraTarget, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.target, self.rows = target, target.rows
        rank = target.rank
        out_l, out_k = factorization(self.rows[1] - self.rows[0], target.lokr_factor)
        in_m, in_n = factorization(target.in_features, target.lokr_factor)
        # LyCORIS keeps w2 whole when the rank is half its size or more
        self.full = target.lokr_full_rank or rank >= max(out_k, in_n) / 2
        self.lokr_w1 = nn.Parameter(_uniform((out_l, in_m), in_m, generator).to(dtype))
        if self.full:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, dtype=dtype))
        else:
            self.lokr_w2_a = nn.Parameter(_uniform((out_k, rank), rank, generator).to(dtype))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n, dtype=dtype))

    @property
    def scale(self) -> float:
        return 1.0 if self.full else self.target.scale

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.full else self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.kron(self.lokr_w1, self.w2())

    def add_to(self, x: torch.Tensor, output: torch.Tensor, layer: nn.Module, whole: bool) -> torch.Tensor:
        w1 = self.lokr_w1.to(x.dtype)
        groups = x.reshape(*x.shape[:-1], w1.shape[1], -1)  # (…, c, d)
        if self.full:
            inner = F.linear(groups, self.lokr_w2.to(x.dtype))
        else:
            inner = F.linear(F.linear(groups, self.lokr_w2_b.to(x.dtype)), self.lokr_w2_a.to(x.dtype))
        across = torch.einsum("ac,...cb->...ab", w1, inner)  # (…, a, b)
        return _add(output, self.scale * across.reshape(*x.shape[:-1], -1), self.rows, whole)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        w2 = {"lokr_w2": self.lokr_w2} if self.full else {"lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b}
        # ComfyUI and LyCORIS scale by alpha/rank of w2_b only when w2 is low-rank; whole, by 1
        alpha = self.target.rank if self.full else self.scale * self.target.rank
        return {"lokr_w1": self.lokr_w1, **w2, "alpha": torch.tensor(float(alpha))}


class _HadamardLinear(torch.autograd.Function):
    """F.linear(x, s·(w1a·w1b) ⊙ (w2a·w2b)) keeping x and the factors for backward, not the
    full-size products (they are rebuilt there)."""

    @staticmethod
    def forward(ctx, x, w1a, w1b, w2a, w2b, scale):
        ctx.save_for_backward(x, w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return F.linear(x, (scale * (w1a @ w1b) * (w2a @ w2b)).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, w1a, w1b, w2a, w2b = ctx.saved_tensors
        m1, m2 = w1a @ w1b, w2a @ w2b
        grad_x = grad @ (ctx.scale * m1 * m2).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = ctx.scale * (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(m1.dtype)
        g1, g2 = grad_w * m2, grad_w * m1
        return grad_x, g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LohaWeight(nn.Module):
    variant = "loha"

    def __init__(self, target: LoraTarget, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.target, self.rows = target, target.rows
        rows, rank, n_in = self.rows[1] - self.rows[0], target.rank, target.in_features

        def normal(shape, std):
            return nn.Parameter((torch.randn(shape, generator=generator) * std).to(dtype))

        self.hada_w1_a, self.hada_w1_b = normal((rows, rank), 0.1), normal((rank, n_in), 1.0)
        self.hada_w2_a, self.hada_w2_b = nn.Parameter(torch.zeros(rows, rank, dtype=dtype)), normal((rank, n_in), 1.0)

    @property
    def scale(self) -> float:
        return self.target.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def add_to(self, x: torch.Tensor, output: torch.Tensor, layer: nn.Module, whole: bool) -> torch.Tensor:
        delta = _HadamardLinear.apply(x, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        return _add(output, delta, self.rows, whole)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a,
                "hada_w2_b": self.hada_w2_b, "alpha": torch.tensor(self.scale * self.target.rank)}


WEIGHTS = {"lora": LoraWeight, "dora": DoraWeight, "lokr": LokrWeight, "loha": LohaWeight}


def make_weight(target: LoraTarget, dtype: torch.dtype, generator: torch.Generator) -> nn.Module:
    return WEIGHTS[target.variant](target, dtype, generator)


def parameter_count(target: LoraTarget) -> int:
    """How many numbers a target trains (to size checkpoints before anything is built)."""
    rows, rank, n_in = target.rows[1] - target.rows[0], target.rank, target.in_features
    if target.variant == "lokr":
        (out_l, out_k), (in_m, in_n) = factorization(rows, target.lokr_factor), factorization(n_in, target.lokr_factor)
        full = target.lokr_full_rank or rank >= max(out_k, in_n) / 2
        return out_l * in_m + (out_k * in_n if full else rank * (out_k + in_n))
    pair = rank * (n_in + rows)
    return {"lora": pair, "dora": pair + rows, "loha": 2 * pair}[target.variant]
