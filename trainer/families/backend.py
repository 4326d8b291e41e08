"""A model of some family, as something to train: ComfyUI's (BFL layout, fused q/k/v) or diffusers'.

A backend knows its family (spec.py), where a LoRA target lives in its model, which blocks there
are, and how to ask the model for a velocity. Everything else (the LoRA maths, the loop) is shared, so both train the
same thing and a test can hold them to the same loss and gradients.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..loop.blocks import BlockRunner
from ..loop.memory import BlockSwap, MemoryConfig, swapped_indices
from ..lora.targets import ModelLayout
from ..lora.weights import LoraSet, LoraWeight, attach, detach_all
from .conditioning import Conditioning
from .spec import Family


class FluxBackend:
    family: Family
    dims: ModelLayout
    guidance_embed: bool
    split_layers: bool  # one Linear per diffusers name (True) or BFL's fused layers (False)
    takes_references: bool = False  # reads Conditioning.references (an edit's source latents: Kontext)
    compute_dtype: torch.dtype
    device: torch.device

    @property
    def variant(self) -> str:
        """The architecture, read from the weights: FLUX.1 dev (and its fine-tunes, Krea among them)
        has a guidance embedding, schnell has none."""
        return self.family.variant(self.guidance_embed)

    def layer(self, w: LoraWeight) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
        """(BFL block name, module, residual-stream args it changes in place) for every block."""
        raise NotImplementedError

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's velocity prediction (float32) for noisy latents at σ."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the frozen model ready for autograd (called once per training run)."""

    @contextmanager
    def lora_applied(self, lora: LoraSet):
        """The model computes with `lora` (its transformer part) added on activations while inside."""
        handles = attach(lora.transformer(), self.layer, self.split_layers)
        try:
            yield
        finally:
            detach_all(handles)

    @contextmanager
    def resident(self, lora: LoraSet, memory: MemoryConfig):
        """For a whole job: with blocks swapped, their weights stay off the device from the first
        step to the last, through every pause, render and fixed-noise loss in between (each pass
        streams them in as training does). Without swapping there is nothing to keep: each
        `training()` segment wraps the blocks on its own."""
        if not memory.swap_blocks or getattr(self, "_resident", None) is not None:
            yield
            return
        self.prepare()
        runner = self._runner(lora, memory)
        self._resident = (runner, memory)
        try:
            yield
        finally:
            self._resident = None
            runner.restore()

    @property
    def block_swap(self) -> BlockSwap | None:
        """The block swap `resident()` holds (to count what is on the device), or None."""
        resident = getattr(self, "_resident", None)
        return resident[0].swap if resident is not None else None

    def swapped_blocks(self, memory: MemoryConfig) -> list[str]:
        """BFL names of the blocks `memory` keeps in CPU memory: a host loading the model for
        training leaves these off the device."""
        names = [name for name, _, _ in self.blocks()]
        return [names[i] for i in swapped_indices(len(names), memory.swap_blocks)] if memory.swap_blocks else []

    @contextmanager
    def training(self, lora: LoraSet, memory: MemoryConfig):
        """LoRA attached and blocks wrapped for backward (see blocks.py, memory.py) while inside;
        inside `resident()`, its blocks are used as they are."""
        resident = getattr(self, "_resident", None)
        if resident is not None and resident[1] != memory:
            raise ValueError(f"Training with memory {memory.describe()!r} inside a job set up for "
                             f"{resident[1].describe()!r}.")
        if resident is None:
            self.prepare()
        with self.lora_applied(lora):
            if resident is not None:
                resident[0].swap.drop_loaded()  # nothing a render left behind is used for backward
                yield
                return
            runner = self._runner(lora, memory)
            try:
                yield
            finally:
                runner.restore()

    def _runner(self, lora: LoraSet, memory: MemoryConfig) -> BlockRunner:
        with_lora = {w.target.block for w in lora.transformer()}
        names, modules, streams = zip(*self.blocks())
        return BlockRunner(list(modules), [n in with_lora for n in names], list(streams), memory, self.device)

    def check_conditioning(self, cond: Conditioning) -> None:
        """`cond` carries what this family reads and nothing it would drop."""
        if cond.references and not self.takes_references:
            raise ValueError(f"The batch has reference images, which this {self.family.label} model does not take in "
                             "(reference images are for edit models: Kontext, FLUX.2).")
        if self.family.pooled and cond.pooled is None:
            raise ValueError(f"{self.family.label} needs the pooled text vector (CLIP-L's); the conditioning has none.")

    def guidance_tensor(self, guidance: float, batch: int) -> torch.Tensor | None:
        if not self.guidance_embed:
            return None
        return torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)
