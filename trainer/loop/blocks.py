"""How each transformer block runs while training.

Three things happen per block, whichever model the block comes from:

* A block with no LoRA whose inputs need no gradient runs without building a graph.
* ComfyUI's FLUX blocks add to their residual stream in place (`img += …`), which breaks
  autograd: a LayerNorm saved the stream before the add. With `inplace_stream` set, a tensor that
  autograd saves is cloned when it shares memory with the stream, and only then.
* Gradient checkpointing: the block runs without a graph on the way forward and again, with
  one, during backward. The stream inputs are cloned first, so the saved inputs stay as they were
  (a checkpoint that re-reads an input the block changed in place computes wrong gradients).
  Which blocks are checkpointed, offloaded, swapped in from the CPU or compiled: memory.py.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .memory import BlockSwap, CpuOffload, MemoryConfig, compile_problem, release_pinned, swapped_indices


@contextmanager
def protect_stream(streams: list[torch.Tensor]):
    """Clone saved tensors that share memory with the residual stream, so in-place adds can't
    change what backward reads."""
    ptrs = {t.untyped_storage().data_ptr() for t in streams}

    def pack(t):
        return t.clone() if t.untyped_storage().data_ptr() in ptrs else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _flatten(args: tuple, kwargs: dict):
    """Tensors of (args, kwargs), found inside tuples, lists and dataclasses too (FLUX.2 blocks get
    their modulation as tuples of ComfyUI's ModulationOut), and a function to put new tensors back
    in their places."""
    tensors: list[torch.Tensor] = []

    def take(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return len(tensors) - 1
        if isinstance(v, (tuple, list)) and v:
            slots = [take(x) for x in v]
            return ("seq", slots) if any(s is not None for s in slots) else None
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            slots = {f.name: take(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return ("fields", slots) if any(s is not None for s in slots.values()) else None
        return None

    slots_a = [take(a) for a in args]
    slots_k = {k: take(v) for k, v in kwargs.items()}

    def put(slot, original, new):
        if slot is None:
            return original
        if isinstance(slot, int):
            return new[slot]
        kind, inner = slot
        if kind == "seq":
            return type(original)(put(s, o, new) for s, o in zip(inner, original))
        return dataclasses.replace(original, **{k: put(s, getattr(original, k), new)
                                                for k, s in inner.items() if s is not None})

    def rebuild(new):
        return (tuple(put(s, a, new) for s, a in zip(slots_a, args)),
                {k: put(slots_k[k], v, new) for k, v in kwargs.items()})

    return tensors, rebuild


def _outputs(out) -> tuple[list[torch.Tensor], callable]:
    if isinstance(out, torch.Tensor):
        return [out], lambda ts: ts[0]
    return list(out), lambda ts: type(out)(ts)


class _Checkpoint(torch.autograd.Function):
    """Forward without a graph; recompute with one during backward (reentrant style).
    `run(tensors, direction)` computes the block (+1 on the way forward, -1 in backward), `done()`
    follows each of its calls, and `offload` (optional) keeps the saved inputs off the device."""

    @staticmethod
    def forward(ctx, run, done, offload, _dummy, *tensors):
        ctx.run, ctx.done, ctx.offload = run, done, offload
        ctx.needs_grad = [t.requires_grad for t in tensors]
        if offload is None:
            ctx.save_for_backward(*tensors)
        else:  # the stream's activations go to the CPU; what needs no gradient (pe, vec) is shared
            ctx.packed = [offload.pack(t) if t.requires_grad else (t, None) for t in tensors]
        with torch.no_grad():
            outs, _ = _outputs(run(list(tensors), 1))
        done()
        return tuple(o.clone() if any(o is t for t in tensors) else o for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors if ctx.offload is None else [ctx.offload.unpack(p) for p in ctx.packed]
        inputs = [t.detach().requires_grad_(g) for t, g in zip(saved, ctx.needs_grad)]
        with torch.enable_grad():
            outs, _ = _outputs(ctx.run(inputs, -1))
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.done()
        return (None, None, None, None, *[t.grad if t.requires_grad else None for t in inputs])


class BlockRunner:
    """Wraps the forward of each block for training; `restore()` puts the originals back.

    `stream_args[i]` names the residual-stream arguments of block i that it changes in place
    (empty for models that add out of place); `has_lora[i]` says whether block i holds a LoRA;
    `memory` says which blocks are checkpointed, offloaded, swapped or compiled (memory.py).
    """

    def __init__(self, blocks: list[nn.Module], has_lora: list[bool], stream_args: list[tuple[str, ...]],
                 memory: MemoryConfig, device: torch.device):
        if memory.compile and compile_problem():
            raise RuntimeError(f"compile is on, but torch.compile does not work in this installation "
                               f"({compile_problem()}); turn compile off.")
        self.memory = memory
        self.blocks, self._saved = [], []
        self.offload = None
        self.swap = BlockSwap(blocks, swapped_indices(len(blocks), memory.swap_blocks), device)  # undoes itself
        try:
            if memory.checkpointing == "offload":
                self.offload = CpuOffload(device)
            for i, (block, lora, streams) in enumerate(zip(blocks, has_lora, stream_args)):
                wrapped = self._wrap(i, block.forward, lora, streams)
                self.blocks.append(block)
                self._saved.append(block.__dict__.get("forward"))
                block.forward = wrapped
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for block, saved in zip(self.blocks, self._saved):
            if saved is None:
                del block.forward
            else:
                block.forward = saved
        self.blocks, self._saved = [], []
        self.swap.restore()
        if self.offload is not None and self.offload.cuda:
            release_pinned(self.swap.device)

    def _wrap(self, index: int, forward, has_lora: bool, stream_names: tuple[str, ...]):
        signature = inspect.signature(forward)
        compute = torch.compile(forward) if self.memory.compile else forward
        checkpointed = self.memory.checkpointed(index) or self.swap.is_swapped(index)
        swap = self.swap

        def streams_of(args, kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            return [bound[n] for n in stream_names if isinstance(bound.get(n), torch.Tensor)]

        def run(args, kwargs, clone_streams: bool):
            if stream_names:
                if clone_streams:
                    bound = signature.bind_partial(*args, **kwargs)
                    for n in stream_names:
                        if isinstance(bound.arguments.get(n), torch.Tensor):
                            bound.arguments[n] = bound.arguments[n].clone()
                    args, kwargs = bound.args, bound.kwargs
                with protect_stream(streams_of(args, kwargs)):
                    return compute(*args, **kwargs)
            return compute(*args, **kwargs)

        def without_graph(args, kwargs):
            swap.load(index)
            try:
                with torch.no_grad():
                    return compute(*args, **kwargs)
            finally:
                swap.release(index)

        def wrapped(*args, **kwargs):
            if not torch.is_grad_enabled():
                return without_graph(args, kwargs)
            # the caller may change its option dicts after this call (ComfyUI's block_index): a
            # recompute must see them as they are now
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            tensors, rebuild = _flatten(args, kwargs)
            if not has_lora and not any(t.requires_grad for t in tensors):
                return without_graph(args, kwargs)
            if not checkpointed:
                return run(args, kwargs, clone_streams=False)
            out_structure = []

            def recompute(new_tensors, direction):
                swap.load(index, direction, recomputed=True)
                out = run(*rebuild(new_tensors), clone_streams=True)
                if not out_structure:
                    out_structure.append(_outputs(out)[1])
                return out

            dummy = torch.empty(0, requires_grad=True)
            outs = _Checkpoint.apply(recompute, lambda: swap.release(index), self.offload, dummy, *tensors)
            return out_structure[0](list(outs))

        return wrapped
