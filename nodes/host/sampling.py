"""Rendering with ComfyUI's own sampler, so validation samples and class images are the very
images the same model and LoRA give in a workflow (KSampler, cfg 1, after FluxGuidance, VAE
Decode, Save Image's 8-bit conversion)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import comfy.model_management
import comfy.sample
import comfy.samplers
import node_helpers
import numpy as np
import torch
from PIL import Image

from ...trainer import files
from ...trainer.data.captions import fill_triggers
from ...trainer.data.images import Shaping, from_tensor
from ...trainer.outputs.progress import Sample

SAMPLERS: list[str] = list(comfy.samplers.KSampler.SAMPLERS)
SCHEDULERS: list[str] = list(comfy.samplers.KSampler.SCHEDULERS)


def encode_prompt(clip, prompt: str):
    """CONDITIONING as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def render(model, vae, conditioning, seed: int, steps: int, guidance: float, sampler: str, scheduler: str,
           width: int, height: int) -> torch.Tensor:
    """One image, as a KSampler (cfg 1) after FluxGuidance and a VAE Decode would make it: (1, H, W, 3).
    Cancel is checked every sampling step (older ComfyUI checks it nowhere inside sampling)."""
    scale = vae.spacial_compression_encode()  # FLUX.1's 16 channels at 1/8, FLUX.2's 128 at 1/16
    latent = torch.zeros(1, model.model.latent_format.latent_channels, height // scale, width // scale)
    positive = conditioning
    if type(model.model).__name__ != "Chroma":  # Chroma's distilled guidance input is 0, as its workflows leave it
        positive = node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})
    out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 1.0, sampler, scheduler,
                              positive, positive, latent, denoise=1.0, seed=seed, disable_pbar=True,
                              callback=lambda *_: comfy.model_management.throw_exception_if_processing_interrupted())
    return vae.decode(out)[:1]


def with_reference(conditioning, vae, image: torch.Tensor):
    """CONDITIONING with `image` (1, H, W, 3) as the edit's reference, as VAE Encode followed by the
    stock ReferenceLatent node makes it (FLUX.1 Kontext reads it as ComfyUI's ref_latents)."""
    latent = vae.encode(image[..., :3])
    return node_helpers.conditioning_set_values(conditioning, {"reference_latents": [latent]}, append=True)


def fitted(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An IMAGE (1, H, W, 3) scaled to cover width×height and centre-cropped to it."""
    pixels = Shaping().apply(from_tensor(image[0, ..., :3]), (width, height))
    return pixels.permute(1, 2, 0)[None]


def save_png(image: torch.Tensor, path: Path) -> Path:
    """With ComfyUI's Save Image 8-bit conversion, so the file matches what it would write."""
    pixels = np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)
    return files.write_image(path, Image.fromarray(pixels))


class RenderStopped(Exception):
    """`should_stop()` ended a render between images."""


class Renderer:
    """An evaluation set, encoded once; rendered for a MODEL (with a LoRA applied) on demand.
    `entries` are (prompt, seed, guidance, steps, label) with `[trigger]` (`[trigger2]`…) still in the prompt."""

    def __init__(self, entries: Sequence, sampler: str, scheduler: str, width: int, height: int, clip, vae,
                 triggers: Sequence[str], folder: Path, reference: torch.Tensor | None = None):
        """`reference`: the image an edit model (Kontext) edits in every render, (1, H, W, 3); it is
        fitted to width×height and goes in as ReferenceLatent does."""
        self.entries, self.sampler, self.scheduler = list(entries), sampler, scheduler
        self.width, self.height, self.vae, self.folder = width, height, vae, folder
        self.triggers, self.clip = tuple(triggers), clip
        self.reference = None if reference is None else fitted(reference, width, height)
        self.conditioning = self._encode(clip)

    def _encode(self, clip) -> dict:
        out = {e.prompt: encode_prompt(clip, fill_triggers(e.prompt, self.triggers)) for e in self.entries}
        if self.reference is not None:
            out = {p: with_reference(c, self.vae, self.reference) for p, c in out.items()}
        return out

    def render(self, model, step: int, should_stop: Callable[[], bool] = lambda: False, clip=None
               ) -> tuple[list[Sample], torch.Tensor]:
        """Every entry at `step`: saved as PNGs (named by step) and returned as an IMAGE batch.
        Cancel is checked every sampling step, `should_stop()` between images (RenderStopped).
        `clip`: encode the prompts with this one (the CLIP with a trained text-encoder LoRA)."""
        conditioning = self.conditioning if clip is None else self._encode(clip)
        samples, images = [], []
        for i, e in enumerate(self.entries):
            if should_stop():
                raise RenderStopped
            image = render(model, self.vae, conditioning[e.prompt], e.seed, e.steps, e.guidance,
                           self.sampler, self.scheduler, self.width, self.height)
            path = save_png(image, self.folder / f"step_{step:06d}_{i:02d}.png")
            samples.append(Sample(step, i, e.label(self.triggers), path))
            images.append(image.cpu())
        return samples, torch.cat(images)

    def render_prompts(self, model, prompts: Sequence[str], should_stop: Callable[[], bool] = lambda: False,
                       clip=None) -> torch.Tensor:
        """For the scores: each prompt (triggers filled in) with the first entry's seed, guidance and
        steps, not saved: (N, H, W, 3). `clip` as in `render`."""
        e, images = self.entries[0], []
        for prompt in prompts:
            if should_stop():
                raise RenderStopped
            image = render(model, self.vae, encode_prompt(clip or self.clip, prompt), e.seed, e.steps, e.guidance,
                           self.sampler, self.scheduler, self.width, self.height)
            images.append(image.cpu())
        return torch.cat(images)
