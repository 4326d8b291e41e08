"""Validation samples: a fixed evaluation set rendered during training through ComfyUI's own
sampler, with the model as it is and the LoRA as it is at that step, so previews are the very
images the same LoRA gives in a workflow (seed 002 §6's matrix: prompts × seeds × guidance ×
step counts)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import node_helpers
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from ..trainer.data import TRIGGER_PLACEHOLDER
from ..trainer.report import Sample
from .types import CATEGORY, Validation


@dataclass(frozen=True)
class EvalEntry:
    prompt: str
    seed: int
    guidance: float
    steps: int

    def label(self, trigger_word: str) -> str:
        prompt = self.prompt.replace(TRIGGER_PLACEHOLDER, trigger_word)
        return f"{prompt} · seed {self.seed} · g {self.guidance:g} · {self.steps} steps"


@dataclass(frozen=True)
class ValidationPlan:
    entries: tuple[EvalEntry, ...]
    every: int
    width: int
    height: int
    sampler: str
    scheduler: str
    before_training: bool


def _numbers(text: str, kind, setting: str) -> list:
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{setting} is {text!r}; give numbers separated by commas, e.g. '3.5, 4.0'.") from None
    if not values:
        raise ValueError(f"{setting} is empty; give at least one value.")
    return values


class ValidationSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxDreamBoothValidation",
            display_name="Validation Samples",
            category=CATEGORY,
            description="Renders a fixed evaluation set every N steps while training, through ComfyUI's own "
                        "sampler, so you can judge likeness as it trains and pick the best checkpoint.",
            inputs=[
                io.String.Input("prompts", multiline=True, default="a photo of [trigger]",
                                tooltip="One prompt per line; [trigger] becomes the dataset's trigger word (a "
                                        "prompt without it shows what the base model still does). Use "
                                        "prompts unlike the training captions to see whether the subject "
                                        "generalises (seed 002 uses 8–12)."),
                io.String.Input("seeds", default="42", tooltip="Comma-separated seeds; each prompt is rendered "
                                                               "with every seed."),
                io.String.Input("guidance", default="3.5",
                                tooltip="Comma-separated FLUX guidance values (seed 002's matrix: 3.5, 3.6, 3.8)."),
                io.String.Input("sample_steps", default="20",
                                tooltip="Comma-separated sampling step counts (seed 002: 32, 36 for quality)."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16, tooltip="Sample width in pixels."),
                io.Int.Input("height", default=512, min=64, max=2048, step=16, tooltip="Sample height in pixels."),
                io.Int.Input("every_n_steps", default=250, min=1, max=100000,
                             tooltip="Render the set every this many steps (seed 002: 250) and at the end."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Boolean.Input("before_training", default=True,
                                 tooltip="Also render the set before the first step: the base model to compare "
                                         "against."),
            ],
            outputs=[Validation.Output(display_name="validation")],
        )

    @classmethod
    def execute(cls, prompts, seeds, guidance, sample_steps, width, height, every_n_steps, sampler_name,
                scheduler, before_training) -> io.NodeOutput:
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise ValueError("prompts is empty; write at least one prompt (one per line).")
        grid = itertools.product(lines, _numbers(seeds, int, "seeds"), _numbers(guidance, float, "guidance"),
                                 _numbers(sample_steps, int, "sample_steps"))
        entries = tuple(EvalEntry(*e) for e in grid)
        return io.NodeOutput(ValidationPlan(entries, every_n_steps, width, height, sampler_name, scheduler,
                                            before_training))


class RenderStopped(Exception):
    """Stop was pressed during a render; the final render, at the step it stopped, follows."""


class Renderer:
    """Encodes the evaluation prompts once; renders them for a MODEL with the LoRA applied."""

    def __init__(self, plan: ValidationPlan, clip, vae, trigger_word: str, folder: Path):
        self.plan, self.vae, self.folder, self.trigger_word = plan, vae, folder, trigger_word
        self.conditioning = {}
        for prompt in {e.prompt for e in plan.entries}:
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt.replace(TRIGGER_PLACEHOLDER, trigger_word)))
            self.conditioning[prompt] = cond

    def render(self, model, step: int, should_stop=lambda: False) -> tuple[list[Sample], torch.Tensor]:
        """Every entry at `step`: saved as PNGs (named by step) and returned as an IMAGE batch.
        Cancel is checked every sampling step, `should_stop()` between images (RenderStopped)."""
        samples, images = [], []
        for i, e in enumerate(self.plan.entries):
            if should_stop():
                raise RenderStopped
            image = render(model, self.vae, self.conditioning[e.prompt], e.seed, e.steps, e.guidance,
                           self.plan.sampler, self.plan.scheduler, self.plan.width, self.plan.height)
            path = save_png(image, self.folder / f"step_{step:06d}_{i:02d}.png")
            samples.append(Sample(step, i, e.label(self.trigger_word), path))
            images.append(image.cpu())
        return samples, torch.cat(images)


def render(model, vae, conditioning, seed: int, steps: int, guidance: float, sampler: str, scheduler: str,
           width: int, height: int) -> torch.Tensor:
    """One image, as a KSampler (cfg 1) after FluxGuidance and a VAE Decode would make it: (1, H, W, 3).
    Cancel is checked every sampling step (older ComfyUI checks it nowhere inside sampling)."""
    latent = torch.zeros(1, 16, height // 8, width // 8)
    positive = node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})
    out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 1.0, sampler, scheduler,
                              positive, positive, latent, denoise=1.0, seed=seed, disable_pbar=True,
                              callback=lambda *_: comfy.model_management.throw_exception_if_processing_interrupted())
    return vae.decode(out)[:1]


def save_png(image: torch.Tensor, path: Path) -> Path:
    """With ComfyUI's Save Image 8-bit conversion, so the file matches what it would write;
    written beside and renamed, so a crash never leaves half a PNG under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)).save(partial, format="PNG")
    os.replace(partial, path)
    return path
