"""A model family's facts, in one place: what the generic core asks a family about.

The loop, the LoRA hooks, the block runner, the memory modes and checkpoints read these fields
and nothing else family-specific; each family's folder builds one `Family` and the registry
(`families/__init__.py`) lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..lora.targets import LayerVocabulary, ModelLayout


@dataclass(frozen=True)
class Family:
    """One family of models a user loads (FLUX.1, FLUX.2, …)."""

    name: str  # what checkpoints and LoRA files record ("dreambooth.family"): "flux1"
    label: str  # what users read in messages: "FLUX.1"
    vocabulary: LayerVocabulary  # LoRA layer names (diffusers'), where they live, presets
    layout: Callable[..., ModelLayout]  # the dims class: built from the loaded model, or from a checkpoint's tuple
    latent_channels: int  # channels of the latents the transformer reads (after the VAE's normalisation)
    patch_size: int  # latent pixels per token side: tokens = (h / patch)·(w / patch)
    timestep_sampling: str  # training's default σ sampling (flow.TimestepSampling mode)
    pooled: bool  # whether the model reads a pooled text vector (Conditioning.pooled)
    modelspec: str  # modelspec.architecture's family name ("flux-1" -> "flux-1-dev/lora")
    variants: tuple[str, str]  # (with a guidance embedding, without): ("dev", "schnell")
    downscale: int = 8  # image pixels per latent pixel, each side (FLUX.2's VAE patchifies: 16)

    def tokens(self, latent_height: int, latent_width: int) -> int:
        """How many image tokens a latent of this size makes."""
        return (latent_height // self.patch_size) * (latent_width // self.patch_size)

    def variant(self, guidance_embed: bool) -> str:
        """The architecture read from the weights: the guidance-distilled one, or the other."""
        return self.variants[0] if guidance_embed else self.variants[1]
