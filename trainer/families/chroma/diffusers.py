"""diffusers' ChromaTransformer2DModel as a training backend: the reference ComfyUI's Chroma
backend is held to (same weights, same loss and LoRA gradients)."""

from __future__ import annotations

import torch
from torch import nn

from ...lora.weights import LoraWeight
from ..backend import FluxBackend
from ..flux1.diffusers import image_ids, pack_latents, unpack_latents
from . import FAMILY
from .layers import ChromaDims


class DiffusersChroma(FluxBackend):
    family = FAMILY
    split_layers = True

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer.requires_grad_(False)
        cfg = transformer.config
        self.dims = ChromaDims(hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
                               mlp_hidden=transformer.single_transformer_blocks[0].proj_mlp.out_features,
                               double_blocks=len(transformer.transformer_blocks),
                               single_blocks=len(transformer.single_transformer_blocks))
        self.guidance_embed = False  # Chroma's guidance input is fixed at 0 (diffusers feeds it 0 itself)
        first = next(transformer.parameters())
        self.compute_dtype, self.device = first.dtype, first.device

    def layer(self, w: LoraWeight) -> nn.Module:
        return self.transformer.get_submodule(w.target.name)

    def blocks(self):
        t = self.transformer
        return ([(f"double_blocks.{i}", b, ()) for i, b in enumerate(t.transformer_blocks)]
                + [(f"single_blocks.{i}", b, ()) for i, b in enumerate(t.single_transformer_blocks)])

    def check_conditioning(self, cond) -> None:
        super().check_conditioning(cond)
        if cond.pooled is not None:
            raise ValueError("Chroma reads T5 tokens only, but the conditioning has a pooled (CLIP-L) vector.")

    def velocity(self, latents, sigmas, cond):
        self.check_conditioning(cond)
        _, _, h, w = latents.shape
        dtype, device = self.compute_dtype, self.device
        context = cond.context.to(device, dtype)
        out = self.transformer(
            hidden_states=pack_latents(latents).to(device, dtype),
            encoder_hidden_states=context,
            timestep=sigmas.to(device, dtype),
            img_ids=image_ids(h, w, device),
            txt_ids=torch.zeros(context.shape[1], 3, device=device),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).float()
