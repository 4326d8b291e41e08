"""ComfyUI's loaded Chroma as a training backend.

`comfy.model_base.Chroma` around `comfy.ldm.chroma.model.Chroma`: FLUX.1's block classes built
without their modulation layers. The model computes every block's modulation once per call from its
`distilled_guidance_layer` and hands each block tuples of ComfyUI's ModulationOut (the block runner
passes them through checkpoints, as for FLUX.2). The velocity comes from the Chroma model's own
call: σ as ComfyUI's Chroma sampling gives it (multiplier 1), the T5 context, and the distilled
guidance input at 0, as ComfyUI's `model_base.Chroma` sets it. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import torch

from ..flux1.comfy import ComfyFlux, sdpa_attention
from . import FAMILY


class ComfyChroma(ComfyFlux):
    family = FAMILY

    @staticmethod
    def check_params(params) -> None:
        if not hasattr(params, "n_layers"):  # ChromaParams: the distilled guidance layer's depth
            raise ValueError("This model has FLUX.1-style blocks (per-block modulation), not Chroma's; "
                             "train it as FLUX.1.")
        if params.in_channels != 64 or params.patch_size != 2:
            raise ValueError(f"This Chroma reads {params.in_channels}-channel input in {params.patch_size}-pixel "
                             "patches, not FLUX.1's VAE latents (Chroma Radiance works on pixels); it can't be "
                             "trained here.")

    def check_conditioning(self, cond) -> None:
        super().check_conditioning(cond)
        if cond.pooled is not None:
            raise ValueError("Chroma reads T5 tokens only, but the conditioning has a pooled (CLIP-L) vector: "
                             "encode the captions with Chroma's T5 text encoder (Load CLIP, type chroma).")

    def velocity(self, latents, sigmas, cond):
        self.check_conditioning(cond)
        dtype, device = self.compute_dtype, self.device
        timestep = self.model.model_sampling.timestep(sigmas.to(device)).float()
        guidance = torch.zeros(latents.shape[0], device=device, dtype=torch.float32)  # Chroma's: always 0
        out = self.dit(latents.to(device, dtype), timestep, cond.context.to(device, dtype), guidance,
                       transformer_options={"optimized_attention_override": sdpa_attention})
        return out.float()
