"""Memory modes: what training keeps on the GPU, and what it recomputes or streams instead.

* Gradient checkpointing (`MemoryConfig.checkpointing`): "blocks" recomputes every k-th block in
  backward instead of keeping its activations; "offload" does that for every block and also keeps
  the block inputs it saves in pinned CPU memory; "off" keeps everything.
* Block swapping (`swap_blocks`): the frozen weights of the last N blocks live in pinned CPU
  memory and are copied in just before each use, the next one on a side stream while the current
  one computes, and dropped right after.
* `torch.compile` of each block's forward.
* `base_quantization` int8: the blocks' Linear weights held in int8 for the run (quantize.py).

None of these changes the maths: a test holds every mode to the plain path's loss and gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..log import logger
from . import quantize

log = logger(__name__)

CHECKPOINTING = ("blocks", "offload", "off")


@dataclass
class MemoryConfig:
    checkpointing: str = "blocks"
    checkpoint_every: int = 1  # with "blocks": checkpoint block i when i % k == 0
    swap_blocks: int = 0
    compile: bool = False
    base_quantization: str = "none"  # or int8: the blocks' Linear weights in int8 (torchao) for the run

    def __post_init__(self):
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing is {self.checkpointing!r}; choose {', '.join(CHECKPOINTING)}.")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every is {self.checkpoint_every}; use 1 (every block) or more.")
        if self.swap_blocks < 0:
            raise ValueError(f"swap_blocks is {self.swap_blocks}; use 0 (off) or a number of blocks.")
        quantize.check(self.base_quantization)

    def checkpointed(self, index: int) -> bool:
        if self.checkpointing == "off":
            return False
        return self.checkpointing == "offload" or index % self.checkpoint_every == 0

    def describe(self) -> str:
        parts = {"off": ["no checkpointing"], "offload": ["checkpointing every block, inputs offloaded to CPU"],
                 "blocks": [f"checkpointing every {_ordinal(self.checkpoint_every)}block"]}[self.checkpointing]
        if self.swap_blocks:
            parts.append(f"{self.swap_blocks} blocks swapped from CPU")
        if self.compile:
            parts.append("torch.compile")
        if self.base_quantization != "none":
            parts.append(f"{self.base_quantization} base weights")
        return ", ".join(parts)


@functools.cache
def compile_problem() -> str | None:
    """Why torch.compile can't run in this installation (no compiler, a broken Triton or
    inductor), or None. Tried once, on a toy function."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure means: don't compile
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return None


def _ordinal(k: int) -> str:
    return "" if k == 1 else {2: "2nd ", 3: "3rd "}.get(k, f"{k}th ")


class CpuOffload:
    """Moves tensors a checkpoint saves to pinned CPU memory on a side stream, and back when
    backward needs them. On a CPU-only run it keeps them as they are."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def pack(self, t: torch.Tensor):
        if not self.cuda or not t.is_cuda:
            return t, None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # the allocator may reuse t's memory only after the copy
        event = self.stream.record_event()
        return host, (t.device, event)

    def unpack(self, packed) -> torch.Tensor:
        host, where = packed
        if where is None:
            return host
        device, event = where
        torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)


class BlockSwap:
    """Keeps the frozen weights of `swapped` blocks in (pinned) CPU memory. `load(i)` puts block
    i's weights on the device, waiting for a prefetch when there was one, and starts copying the
    next swapped block in `direction` (+1 forward, -1 while backward recomputes); `release(i)`
    lets them go. LoRA weights are not the block's parameters and stay where they are.

    A swapped block may come on the CPU already (a host that never loaded it onto the GPU):
    `restore()` puts each weight back where it was found, not on the device. On a CPU-only run
    a load is a real copy too, so what sits "on the device" can be counted (`on_host`)."""

    def __init__(self, blocks: list[nn.Module], swapped: list[int], device: torch.device):
        self.blocks, self.device = blocks, device
        self.swapped = sorted(swapped)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: dict[int, list[tuple[nn.Parameter | torch.Tensor, torch.Tensor]]] = {}
        self.found: dict[int, list[torch.device]] = {}  # where each weight was before
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.to_recompute: set[int] = set()  # swapped blocks whose backward is still to come
        self.loads = self.prefetched = self.copies = 0
        try:
            for i in self.swapped:
                pairs, found = self.host.setdefault(i, []), self.found.setdefault(i, [])
                for t in _tensors(blocks[i]):
                    found.append(t.device)
                    # size(), not shape: a quantized weight (ComfyUI-GGUF's) reports its unpacked shape
                    host = torch.empty(t.size(), dtype=t.dtype, pin_memory=self.cuda)
                    host.copy_(t.data)
                    pairs.append((t, host))
                    t.data = host
        except BaseException:  # e.g. not enough RAM to pin: put back what moved
            self.restore()
            raise
        if self.cuda:
            torch.cuda.empty_cache()

    def is_swapped(self, i: int) -> bool:
        return i in self.host

    def _copy_in(self, i: int) -> None:
        if i in self.ready:
            return
        self.copies += 1
        with torch.inference_mode(False):  # a render may load it: the copy must still train
            if not self.cuda:
                for t, host in self.host[i]:
                    t.data = host.clone()
                self.ready[i] = None
                return
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for t, host in self.host[i]:
                    t.data = host.to(self.device, non_blocking=True)
            self.ready[i] = self.stream.record_event()

    def load(self, i: int, direction: int = 1, recomputed: bool = False) -> None:
        """`recomputed`: the block will run again in backward (a checkpoint)."""
        if i not in self.host:
            if direction > 0 and i + 1 in self.host:  # the first swapped block comes next
                self._copy_in(i + 1)
            return
        self.loads += 1
        self.prefetched += i in self.ready
        self._copy_in(i)
        event = self.ready[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t, _ in self.host[i]:
                t.data.record_stream(compute)
        if direction > 0:
            if recomputed:
                self.to_recompute.add(i)
            following = [j for j in self.swapped if j > i]
        else:
            self.to_recompute.discard(i)
            following = [j for j in self.to_recompute if j < i]
        if following:
            self._copy_in(min(following, key=lambda j: abs(j - i)))

    def release(self, i: int) -> None:
        if i not in self.ready or (i == self.swapped[-1] and i in self.to_recompute):
            return  # not loaded; or the last block, the first one backward needs: it stays
        self.ready.pop(i)
        for t, host in self.host[i]:
            t.data = host

    def drop_loaded(self) -> None:
        """Let go of every copy still on the device (a prefetch a cut-short pass left behind)."""
        if self.cuda and self.ready:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for i in list(self.ready):
            self.ready.pop(i)
            for t, host in self.host[i]:
                t.data = host
        self.to_recompute = set()

    def on_host(self, t: torch.Tensor) -> bool:
        """Whether `t` is one of the CPU copies this swap keeps (not on the device)."""
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == h.untyped_storage().data_ptr() for pairs in self.host.values() for _, h in pairs)

    def restore(self) -> None:
        """Every weight back where it was before: the device, or the CPU where a host left it."""
        self.drop_loaded()
        with torch.inference_mode(False):
            for i, pairs in self.host.items():
                for (t, host), device in zip(pairs, self.found.get(i, [])):
                    if device.type != "cpu":
                        t.data = host.to(device)
                    elif host.is_pinned():  # back to pageable memory: the pinned pages are returned
                        t.data = torch.empty(host.shape, dtype=host.dtype).copy_(host)
                    else:
                        t.data = host
        self.host, self.found, self.ready, self.to_recompute = {}, {}, {}, set()
        if self.cuda:
            release_pinned(self.device)


def release_pinned(device: torch.device) -> None:
    """Give the pinned pages PyTorch keeps cached back to the OS (ComfyUI lives on after a run)."""
    if hasattr(torch._C, "_host_emptyCache"):
        torch.cuda.synchronize(device)
        torch._C._host_emptyCache()


def _tensors(module: nn.Module):
    for store in (module._parameters, module._buffers):
        for t in store.values():
            if t is not None:
                yield t
    for child in module.children():
        yield from _tensors(child)


def swapped_indices(count: int, swap: int) -> list[int]:
    """Which blocks stream from the CPU: the last `swap` of `count` (the last stays loaded from
    its forward to its recompute, the first backward needs)."""
    if swap > count:
        raise ValueError(f"swap_blocks is {swap} but the model has {count} blocks; use at most {count}.")
    return list(range(count - swap, count))
