"""The frozen base model held in int8 while a LoRA trains on it (`base_quantization`).

Weight-only int8 through torchao (`Int8WeightOnlyConfig`, one scale per output row): the Linear
weights of the transformer blocks are stored as int8 and dequantized inside each matmul, about
half of bf16's memory. The LoRA stays on activations in full precision; the int8 weights get no
gradient. What other tools call this (mflux's `quantize`, SimpleTuner's `base_model_precision`,
ai-toolkit's `quantize`) is in trainer/recipe/quantization.py.

`QuantizedBase` swaps each chosen layer's weight for its int8 form, computed on the compute
device, and keeps the original Parameter object aside where it was; `restore()` puts the
originals back, so the model is unchanged after the run. Models whose Linear weights are 8-bit or
quantized already (fp8, a GGUF file's) are refused: there is nothing to gain.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..log import logger

log = logger(__name__)

BASE_QUANTIZATIONS = ("none", "int8")
INSTALL = "pip install torchao"
QUANTIZABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check(mode: str) -> None:
    """Before anything is loaded: the mode is known and its library is installed."""
    if mode not in BASE_QUANTIZATIONS:
        raise ValueError(f"base_quantization is {mode!r}; choose {', '.join(BASE_QUANTIZATIONS)}.")
    if mode == "int8" and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"base_quantization int8 quantizes the model with torchao, which is not installed: "
                         f"`{INSTALL}` into the Python that runs this (ComfyUI's), or set base_quantization "
                         "to none.")


def block_linears(blocks) -> dict[str, nn.Linear]:
    """The Linear layers of a backend's blocks, by BFL block name and their path inside it."""
    return {f"{name}.{path}": m for name, block, _ in blocks for path, m in block.named_modules()
            if isinstance(m, nn.Linear)}


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


class QuantizedBase:
    """`layers` with int8 weights (computing in `dtype` on `device`) until `restore()`.

    torchao quantizes each weight (an `Int8Tensor`) and computes its matmul, but the layer does not
    hold that tensor subclass: ComfyUI measures, moves and copies the model's tensors inside
    inference mode, which torchao's tensors don't support. The layer holds the plain tensors the
    subclass is made of (`weight` is its int8 data, `weight_scale` its per-row scales) and its
    forward rebuilds the `Int8Tensor` from them for each call, so the host (and block swap) only
    ever sees ordinary tensors."""

    def __init__(self, layers: dict[str, nn.Linear], device: torch.device, dtype: torch.dtype):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        problems = {name: _stored_as(m.weight) for name, m in layers.items()
                    if not _plain(m.weight) or m.weight.dtype not in QUANTIZABLE_DTYPES}
        if problems:
            name, stored = next(iter(problems.items()))
            raise ValueError(f"base_quantization is int8, but this model's weights are {stored} already "
                             f"({len(problems)} of the {len(layers)} layers, e.g. {name}): they are as small as int8 "
                             "or smaller. Set base_quantization to none to train on them as they are.")
        self.originals: dict[str, tuple[nn.Linear, nn.Parameter, nn.Parameter | None]] = {}
        self.bytes_before = self.bytes_after = 0
        try:
            with torch.inference_mode(False), torch.no_grad():
                for name, m in layers.items():
                    self.originals[name] = (m, m.weight, m.bias)
                    self.bytes_before += m.weight.nbytes
                    probe = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
                    probe.weight = nn.Parameter(m.weight.detach().to(device, dtype), requires_grad=False)
                    quantize_(probe, Int8WeightOnlyConfig())
                    _park(m, probe.weight)
                    if m.bias is not None:
                        m.bias = nn.Parameter(m.bias.detach().to(device, dtype), requires_grad=False)
                    self.bytes_after += sum(t.nbytes for t in _parked(m).values())
        except BaseException:
            self.restore()
            raise
        log.info("Base weights in int8 (torchao): %d layers, %.1f MB → %.1f MB.", len(layers),
                 self.bytes_before / 1e6, self.bytes_after / 1e6)

    def restore(self) -> None:
        """Every layer back to its original weight and bias (the same Parameter objects)."""
        for m, weight, bias in self.originals.values():
            _unpark(m)
            m.weight, m.bias = weight, bias
        self.originals = {}


def _park(m: nn.Linear, quantized: torch.Tensor) -> None:
    """Hold torchao's tensor as the plain tensors it is made of, and compute through it."""
    names, meta = quantized.__tensor_flatten__()
    inner = {n: getattr(quantized, n) for n in names}
    m.weight = nn.Parameter(inner.pop("qdata"), requires_grad=False)
    for n, t in inner.items():
        m.register_buffer(f"weight_{n}", t)
    m.__dict__["_int8"] = (type(quantized), names, meta, quantized.size(), quantized.stride())
    m.forward = _int8_forward.__get__(m)


def _parked(m: nn.Linear) -> dict[str, torch.Tensor]:
    _, names, *_ = m.__dict__["_int8"]
    return {n: m.weight if n == "qdata" else getattr(m, f"weight_{n}") for n in names}


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    cls, _, meta, size, stride = self.__dict__["_int8"]
    weight = cls.__tensor_unflatten__(_parked(self), meta, size, stride)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def _unpark(m: nn.Linear) -> None:
    if "_int8" not in m.__dict__:
        return
    _, names, *_ = m.__dict__.pop("_int8")
    m.__dict__.pop("forward", None)
    for n in names:
        m._buffers.pop(f"weight_{n}", None)


def _stored_as(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.") + ("" if _plain(t) else f" ({type(t).__name__})")


@contextmanager
def quantized_base(backend, mode: str, keep: Callable[[str, nn.Linear], bool] = lambda name, layer: True):
    """While inside, the Linear weights of `backend`'s blocks (those `keep` accepts) are held as
    `mode` (int8) on its device; afterwards the model is as it was. "none": nothing changes."""
    check(mode)
    if mode == "none":
        yield None
        return
    layers = {name: m for name, m in block_linears(backend.blocks()).items() if keep(name, m)}
    quantized = QuantizedBase(layers, backend.device, backend.compute_dtype)
    try:
        yield quantized
    finally:
        quantized.restore()
