"""diffusers' Flux2Transformer2DModel as a training backend: the reference ComfyUI's FLUX.2 backend
is held to (same weights, same loss and LoRA gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...lora.weights import LoraWeight
from ..backend import FluxBackend
from . import FAMILY

TEXT_TOKENS = 512  # FLUX.2's text length: shorter contexts are zero-padded in front, as ComfyUI does


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C): FLUX.2 reads one token per latent pixel."""
    return latents.flatten(2).transpose(1, 2)


def image_ids(height: int, width: int, device) -> torch.Tensor:
    """RoPE positions (t, row, column, l) of the image tokens."""
    ids = torch.zeros(height, width, 4, device=device)
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(-1, 4)


def text_ids(tokens: int, device) -> torch.Tensor:
    """RoPE positions of the text tokens: their index on the fourth axis."""
    ids = torch.zeros(tokens, 4, device=device)
    ids[:, 3] = torch.arange(tokens, device=device)
    return ids


class DiffusersFlux2(FluxBackend):
    family = FAMILY
    split_layers = True

    def __init__(self, transformer: nn.Module):
        from .layers import Flux2Dims

        self.transformer = transformer.requires_grad_(False)
        cfg = transformer.config
        self.dims = Flux2Dims(hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
                              mlp_hidden=transformer.transformer_blocks[0].ff.linear_out.in_features,
                              double_blocks=len(transformer.transformer_blocks),
                              single_blocks=len(transformer.single_transformer_blocks))
        self.guidance_embed = bool(cfg.guidance_embeds)
        first = next(transformer.parameters())
        self.compute_dtype, self.device = first.dtype, first.device

    def layer(self, w: LoraWeight) -> nn.Module:
        """diffusers' own layer; FLUX.2's single-block slices (q, k, v, proj_mlp) live in its fused
        `attn.to_qkv_mlp_proj`, as in BFL's layout."""
        if w.target.name.count(".") < 2:  # a model-level layer (the shared modulation)
            return self.transformer.get_submodule(w.target.name)
        group, block, name = w.target.name.split(".", 2)
        if group == "single_transformer_blocks" and w.target.part is not None:
            name = "attn.to_qkv_mlp_proj"
        return self.transformer.get_submodule(f"{group}.{block}.{name}")

    def blocks(self):
        t = self.transformer
        return ([(f"double_blocks.{i}", b, ()) for i, b in enumerate(t.transformer_blocks)]
                + [(f"single_blocks.{i}", b, ()) for i, b in enumerate(t.single_transformer_blocks)])

    def velocity(self, latents, sigmas, cond):
        self.check_conditioning(cond)
        b, c, h, w = latents.shape
        dtype, device = self.compute_dtype, self.device
        context = cond.context.to(device, dtype)
        if context.shape[1] < TEXT_TOKENS:
            context = F.pad(context, (0, 0, TEXT_TOKENS - context.shape[1], 0))
        out = self.transformer(
            hidden_states=pack_latents(latents).to(device, dtype),
            encoder_hidden_states=context,
            timestep=sigmas.to(device, dtype),
            img_ids=image_ids(h, w, device),
            txt_ids=text_ids(context.shape[1], device),
            guidance=self.guidance_tensor(cond.guidance, b),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w).float()
