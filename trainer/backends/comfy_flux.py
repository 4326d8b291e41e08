"""ComfyUI's loaded FLUX as a training backend.

Takes the `comfy.model_base.Flux` behind a ModelPatcher, already on its device. Nothing here
imports ComfyUI: the host's objects are used through their attributes, so this file stays part
of the standalone library (and is exercised by the host tests).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from torch import nn

from ..layers import FluxDims
from ..lora import LoraWeight
from . import FluxBackend


def _unsupported(params) -> str | None:
    if getattr(params, "global_modulation", False) or getattr(params, "mlp_silu_act", False):
        return "FLUX.2 / Chroma-style blocks"
    if getattr(params, "yak_mlp", False):
        return "a gated-MLP FLUX variant"
    if params.in_channels != 16 or params.patch_size != 2:
        return f"{params.in_channels}-channel input (Fill / Depth / Canny models)"
    return None


class ComfyFlux(FluxBackend):
    split_layers = False

    def __init__(self, base_model, training_flag: Callable[[bool], None] | None = None):
        """`training_flag(on)` switches the host into its autograd-friendly kernels (ComfyUI's
        `model_management.in_training`); the nodes pass it, tests may too."""
        dit = base_model.diffusion_model
        params = dit.params
        problem = _unsupported(params)
        if problem:
            raise ValueError(f"This model has {problem}; this pack trains FLUX.1 models "
                             "(dev, schnell, Krea, Kontext-free fine-tunes).")
        self.model, self.dit = base_model, dit
        self.training_flag = training_flag
        self.dims = FluxDims(params.hidden_size, int(params.hidden_size * params.mlp_ratio),
                             params.depth, params.depth_single_blocks)
        self.guidance_embed = bool(params.guidance_embed)
        if hasattr(base_model, "get_dtype_inference"):
            self.compute_dtype = base_model.get_dtype_inference()
        else:
            self.compute_dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
        self.device = dit.img_in.weight.device

    def layer(self, w: LoraWeight) -> nn.Module:
        return self.dit.get_submodule(w.target.bfl_module)

    def blocks(self):
        return ([(f"double_blocks.{i}", b, ("img", "txt")) for i, b in enumerate(self.dit.double_blocks)]
                + [(f"single_blocks.{i}", b, ("x",)) for i, b in enumerate(self.dit.single_blocks)])

    def prepare(self) -> None:
        """Weights loaded inside ComfyUI's `inference_mode` can't be saved for backward; swap
        each such tensor for a normal copy of itself (one tensor at a time, values unchanged).
        Layers whose weights ComfyUI streams in per call (dynamic VRAM's `_v`, meta tensors) hand
        autograd fresh copies already and are left alone."""
        for module in self.dit.modules():
            if hasattr(module, "_v"):
                continue
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and t.is_inference() and not t.is_meta:
                        copy = t.clone()
                        store[name] = nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy

    @contextmanager
    def training(self, lora, checkpointing):
        if self.training_flag:
            self.training_flag(True)
        try:
            with super().training(lora, checkpointing):
                yield
        finally:
            if self.training_flag:
                self.training_flag(False)

    def velocity(self, latents, sigmas, context, pooled, guidance):
        dtype, device = self.compute_dtype, self.device
        timestep = self.model.model_sampling.timestep(sigmas.to(device)).float()
        out = self.dit(latents.to(device, dtype), timestep, context.to(device, dtype),
                       y=pooled.to(device, dtype), guidance=self.guidance_tensor(guidance, latents.shape[0]),
                       transformer_options={})
        return out.float()
