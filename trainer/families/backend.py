"""One FLUX, two implementations: ComfyUI's (BFL layout, fused q/k/v) and diffusers'.

A backend knows where a LoRA target lives in its model, which blocks there are, and how to ask
the model for a velocity. Everything else (the LoRA maths, the loop) is shared, so both train the
same thing and a test can hold them to the same loss and gradients.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..loop.blocks import BlockRunner
from ..loop.memory import MemoryConfig
from ..lora.targets import ModelLayout
from ..lora.weights import LoraSet, LoraWeight, attach, detach_all


class FluxBackend:
    dims: ModelLayout
    guidance_embed: bool
    split_layers: bool  # one Linear per diffusers name (True) or BFL's fused layers (False)
    compute_dtype: torch.dtype
    device: torch.device

    def layer(self, w: LoraWeight) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
        """(BFL block name, module, residual-stream args it changes in place) for every block."""
        raise NotImplementedError

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor, guidance: float) -> torch.Tensor:
        """The model's velocity prediction (float32) for noisy latents at σ."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the frozen model ready for autograd (called once per training run)."""

    @contextmanager
    def lora_applied(self, lora: LoraSet):
        """The model computes with `lora` added on activations while inside."""
        handles = attach(lora, self.layer, self.split_layers)
        try:
            yield
        finally:
            detach_all(handles)

    @contextmanager
    def training(self, lora: LoraSet, memory: MemoryConfig):
        """LoRA attached and blocks wrapped for backward (see blocks.py, memory.py) while inside."""
        self.prepare()
        with_lora = {w.target.block for w in lora}
        names, modules, streams = zip(*self.blocks())
        with self.lora_applied(lora):
            runner = BlockRunner(list(modules), [n in with_lora for n in names], list(streams), memory, self.device)
            try:
                yield
            finally:
                runner.restore()

    def guidance_tensor(self, guidance: float, batch: int) -> torch.Tensor | None:
        if not self.guidance_embed:
            return None
        return torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)
