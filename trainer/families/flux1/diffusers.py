"""diffusers' FluxTransformer2DModel as a training backend."""

from __future__ import annotations

import torch
from torch import nn

from ...lora.weights import LoraWeight
from ..backend import FluxBackend
from . import FAMILY
from .layers import FluxDims


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, C·4): one token per 2×2 patch, as FLUX reads images."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device, index: int = 0) -> torch.Tensor:
    """RoPE positions of the image tokens: (index, row, column); index 1 for a Kontext reference."""
    ids = torch.full((height // 2, width // 2, 3), float(index), device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class DiffusersFlux(FluxBackend):
    family = FAMILY
    split_layers = True
    takes_references = True  # FLUX.1 Kontext [dev], as diffusers' FluxKontextPipeline feeds its image

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer.requires_grad_(False)
        cfg = transformer.config
        self.dims = FluxDims(
            hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
            mlp_hidden=transformer.single_transformer_blocks[0].proj_mlp.out_features,
            double_blocks=len(transformer.transformer_blocks),
            single_blocks=len(transformer.single_transformer_blocks),
        )
        self.guidance_embed = bool(cfg.guidance_embeds)
        first = next(transformer.parameters())
        self.compute_dtype, self.device = first.dtype, first.device

    def layer(self, w: LoraWeight) -> nn.Module:
        return self.transformer.get_submodule(w.target.name)

    def blocks(self):
        t = self.transformer
        return ([(f"double_blocks.{i}", b, ()) for i, b in enumerate(t.transformer_blocks)]
                + [(f"single_blocks.{i}", b, ()) for i, b in enumerate(t.single_transformer_blocks)])

    def velocity(self, latents, sigmas, cond):
        self.check_conditioning(cond)
        b, _, h, w = latents.shape
        context, pooled, guidance = cond.context, cond.pooled, cond.guidance
        dtype, device = self.compute_dtype, self.device
        tokens, ids = pack_latents(latents), image_ids(h, w, device)
        target = tokens.shape[1]
        if len(cond.references) > 1:
            raise ValueError("FLUX.1 Kontext takes one reference image here; the batch has "
                             f"{len(cond.references)}.")
        for ref in cond.references:  # Kontext: the reference's tokens after the target's, at RoPE index 1
            tokens = torch.cat([tokens, pack_latents(ref.to(tokens.device))], dim=1)
            ids = torch.cat([ids, image_ids(ref.shape[-2], ref.shape[-1], device, index=1)])
        out = self.transformer(
            hidden_states=tokens.to(device, dtype),
            encoder_hidden_states=context.to(device, dtype),
            pooled_projections=pooled.to(device, dtype),
            timestep=sigmas.to(device, dtype),
            img_ids=ids,
            txt_ids=torch.zeros(context.shape[1], 3, device=device),
            guidance=self.guidance_tensor(guidance, b),
            return_dict=False,
        )[0]
        return unpack_latents(out[:, :target], h, w).float()  # the target's tokens: the loss covers them only
