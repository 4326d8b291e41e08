"""ComfyUI's loaded FLUX as a training backend.

Takes the `comfy.model_base.Flux` behind a ModelPatcher, already on its device. Nothing here
imports ComfyUI: the host's objects are used through their attributes, so this file stays part
of the standalone library (and is exercised by the host tests).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...lora.weights import LoraWeight
from ..backend import FluxBackend
from . import FAMILY


def _unsupported(params) -> str | None:
    if hasattr(params, "n_layers"):  # ChromaParams: modulation from a distilled guidance layer
        return "Chroma's blocks (modulation from its distilled_guidance_layer); it trains as Chroma (ComfyChroma)"
    if getattr(params, "global_modulation", False) or getattr(params, "mlp_silu_act", False):
        return "FLUX.2-style blocks (shared modulation); it trains as FLUX.2 (ComfyFlux2)"
    if getattr(params, "yak_mlp", False):
        return "a gated-MLP FLUX variant"
    if params.in_channels != 16 or params.patch_size != 2:
        return f"{params.in_channels}-channel input (Fill / Depth / Canny models)"
    return None


class ComfyFlux(FluxBackend):
    family = FAMILY
    split_layers = False
    takes_references = True  # FLUX.1 Kontext [dev]: ComfyUI's ref_latents, as its ReferenceLatent node feeds them

    def __init__(self, base_model, device: torch.device, training_flag: Callable[[bool], None] | None = None):
        """`device` is where the model computes (the patcher's load device). `training_flag(on)`
        switches the host into its autograd-friendly kernels (ComfyUI's `in_training`)."""
        dit = base_model.diffusion_model
        params = dit.params
        self.check_params(params)
        self.model, self.dit = base_model, dit
        self.training_flag = training_flag
        self.dims = self.family.layout(params.hidden_size, int(params.hidden_size * params.mlp_ratio),
                                       params.depth, params.depth_single_blocks)
        self.guidance_embed = bool(getattr(params, "guidance_embed", False))  # Chroma's params have none
        if hasattr(base_model, "get_dtype_inference"):
            self.compute_dtype = base_model.get_dtype_inference()
        else:
            self.compute_dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
        self.device = torch.device(device)

    @staticmethod
    def check_params(params) -> None:
        """The loaded `comfy.ldm.flux` model is one this family trains."""
        problem = _unsupported(params)
        if problem:
            raise ValueError(f"This model has {problem}; this backend trains FLUX.1 models "
                             "(dev, schnell, Krea, Kontext and fine-tunes of them).")

    def layer(self, w: LoraWeight) -> nn.Module:
        return self.dit.get_submodule(w.target.bfl_module)

    def blocks(self):
        return ([(f"double_blocks.{i}", b, ("img", "txt")) for i, b in enumerate(self.dit.double_blocks)]
                + [(f"single_blocks.{i}", b, ("x",)) for i, b in enumerate(self.dit.single_blocks)])

    def prepare(self) -> None:
        usable_by_autograd(self.dit)

    @contextmanager
    def training(self, lora, memory):
        """Also puts the model in train mode, which steers ComfyUI's fp8 layers off their
        matmul-only fast path (it has no backward); FLUX has no dropout, so nothing else changes."""
        was_training = self.dit.training
        if self.training_flag:
            self.training_flag(True)
        self.dit.train()
        try:
            with super().training(lora, memory):
                yield
        finally:
            self.dit.train(was_training)
            if self.training_flag:
                self.training_flag(False)

    def velocity(self, latents, sigmas, cond):
        self.check_conditioning(cond)
        dtype, device = self.compute_dtype, self.device
        timestep = self.model.model_sampling.timestep(sigmas.to(device)).float()
        out = self.dit(latents.to(device, dtype), timestep, cond.context.to(device, dtype),
                       y=cond.pooled.to(device, dtype), guidance=self.guidance_tensor(cond.guidance, latents.shape[0]),
                       transformer_options={"optimized_attention_override": sdpa_attention}, **self.refs(cond))
        return out.float()

    def refs(self, cond) -> dict:
        """The reference latents as ComfyUI's model takes them (`ref_latents`, clean, already in the
        model's latent space; the model appends their tokens after the target's and returns only the
        target's, so the loss covers those alone) with the model's own reference method (FLUX.1: offset)."""
        if not cond.references:
            return {}
        method = getattr(self.dit.params, "default_ref_method", "offset")
        return {"ref_latents": [r.to(self.device, self.compute_dtype) for r in cond.references],
                "ref_latents_method": method}


def usable_by_autograd(model: nn.Module) -> None:
    """Weights loaded inside ComfyUI's `inference_mode` can't be saved for backward; swap each such
    tensor for a normal copy of itself (one tensor at a time, values unchanged). Layers whose
    weights ComfyUI streams in per call (dynamic VRAM's `_v`, meta tensors) hand autograd fresh
    copies already and are left alone."""
    for module in model.modules():
        if hasattr(module, "_v"):
            continue
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_inference() and not t.is_meta:
                    store[name] = _fresh_copy(t)


def _fresh_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) copy of `t`, a Parameter if it was one. A tensor subclass
    whose clone() is itself (ComfyUI-GGUF's quantized weights) is copied as plain data and keeps
    its type and attributes (quantization type, unpacked shape)."""
    copy = t.clone()
    if copy is t:
        copy = t.as_subclass(torch.Tensor).clone().as_subclass(type(t))
    if isinstance(t, nn.Parameter):
        copy = nn.Parameter(copy, requires_grad=False)
    if type(t) not in (torch.Tensor, nn.Parameter):
        copy.__dict__.update(t.__dict__)
    return copy


def sdpa_attention(_default, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    """PyTorch's scaled-dot-product attention in the signature of ComfyUI's attention functions.
    Used instead of whatever ComfyUI was started with (sage, flash, xformers, sub-quadratic): it
    has a backward on every device and is the fast path on all of them."""
    if not skip_reshape:
        b, _, d = q.shape
        q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 2:
        mask = mask[None]
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)
