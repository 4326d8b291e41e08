"""Validation samples: a fixed evaluation set rendered during training through ComfyUI's own
sampler, with the model as it is and the LoRA as it is at that step, so previews are the very
images the same LoRA gives in a workflow (an evaluation matrix: prompts × seeds × guidance
× step counts)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from comfy_api.latest import io

from ..trainer.data import images
from ..trainer.data.captions import fill_triggers
from ..trainer.log import logger
from ..trainer.loop import scoring
from ..trainer.loop.job import ValidationSchedule
from ..trainer.loop.scoring import ScoringPlan
from ..trainer.outputs import scores
from ..trainer.parsing import number_list
from ..trainer.recipe import from_run
from ..trainer.recipe.schema import ValidationSection
from . import ids, sockets
from .host import sampling, vision

log = logger(__name__)


@dataclass(frozen=True)
class EvalEntry:
    prompt: str
    seed: int
    guidance: float
    steps: int

    def label(self, triggers: Sequence[str]) -> str:
        prompt = fill_triggers(self.prompt, triggers)
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
    clip_vision: object | None = None  # ComfyUI's CLIP_VISION: likeness and drift at every render
    max_drift: float = scores.DEFAULT_MAX_DRIFT
    reference_image: object = None  # IMAGE an edit model (Kontext) edits; None: the dataset's first control image

    def schedule(self) -> ValidationSchedule:
        return ValidationSchedule(self.every, self.before_training, len(self.entries))

    def check(self, triggers: Sequence[str]) -> None:
        """Every prompt names a subject the dataset has (before anything is encoded)."""
        for e in self.entries:
            fill_triggers(e.prompt, triggers)

    def recipe_section(self) -> tuple[ValidationSection, list[str]]:
        """This plan as a recipe's validation section, and what that can't hold (several seeds, …)."""
        e = self.entries
        section, notes = from_run.validation_section([x.prompt for x in e], [x.seed for x in e],
                                                     [x.guidance for x in e], [x.steps for x in e], self.every,
                                                     self.width, self.height, self.before_training, self.sampler,
                                                     self.scheduler)
        if self.clip_vision is None:
            return section, notes
        return dataclasses.replace(section, max_drift=self.max_drift), notes + [
            "validation.scores: the scores' CLIP_VISION is a model ComfyUI loaded; on the command line set "
            "validation.scores to a transformers CLIP/SigLIP folder."]

    def scoring(self, dataset) -> ScoringPlan | None:
        """Likeness and drift for this set (None without a CLIP_VISION: no scores)."""
        if self.clip_vision is None:
            return None
        e = self.entries[0]  # the scores' renders take the first entry's seed, guidance and steps
        how = f"seed {e.seed}, {e.steps} steps, guidance {e.guidance:g}, {self.width}×{self.height}, " \
              f"{self.sampler}/{self.scheduler}"
        return scoring.plan(vision.ClipVisionEmbedder(self.clip_vision), dataset, [x.prompt for x in self.entries],
                            self.max_drift, how)

    def renderer(self, clip, vae, triggers: Sequence[str], folder, dataset=None) -> sampling.Renderer:
        """With the reference image an edit LoRA is judged on: `reference_image`, else the first
        control image of an edit-pair `dataset` (Kontext), else none."""
        reference = self.reference_image
        if reference is None and dataset is not None and dataset.items and dataset.items[0].control is not None:
            reference = images.to_tensor(images.open_rgb(dataset.items[0].control))
        return sampling.Renderer(self.entries, self.sampler, self.scheduler, self.width, self.height, clip, vae,
                                 triggers, folder, reference)


def plan_from_recipe(section, resolution: int) -> ValidationPlan | None:
    """A recipe's `validation` section as the plan Validation Samples makes (None without prompts)."""
    if not section.prompts:
        return None
    size = section.size or resolution
    if section.scores:
        log.info("validation.scores %r is the command line's: in ComfyUI, connect Load CLIP Vision to a Validation "
                 "Samples node's clip_vision for scores.", section.scores)
    entries = tuple(EvalEntry(p, section.seed, section.guidance, section.steps) for p in section.prompts)
    return ValidationPlan(entries, section.every, size, size, "euler", "simple", section.before_training)


class ValidationSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.VALIDATION,
            display_name="Validation Samples",
            category=sockets.Category.TRAINING,
            description="Renders a fixed evaluation set every N steps while training, through ComfyUI's own "
                        "sampler, so you can judge likeness as it trains and pick the best checkpoint. With a "
                        "CLIP_VISION it scores likeness and drift at every render and names the best checkpoint.",
            inputs=[
                io.String.Input("prompts", multiline=True, default="a photo of [trigger]",
                                tooltip="One prompt per line; [trigger] becomes the dataset's trigger word (a "
                                        "prompt without it shows what the base model still does). With several "
                                        "subjects, [trigger] is the first one's, [trigger2] the second's… in the "
                                        "order they are chained (Dataset Report lists them). Use "
                                        "prompts unlike the training captions to see whether the subject "
                                        "generalises (8–12 prompts make a good evaluation set)."),
                io.String.Input("seeds", default="42", tooltip="Comma-separated seeds; each prompt is rendered "
                                                               "with every seed."),
                io.String.Input("guidance", default="3.5",
                                tooltip="Comma-separated FLUX guidance values, e.g. 3.5, 3.6, 3.8 to compare. "
                                        "3.5 is FLUX.1-dev's usual value."),
                io.String.Input("sample_steps", default="20",
                                tooltip="Comma-separated sampling step counts: 20 for quick looks, 32–36 to judge "
                                        "skin and detail."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16, tooltip="Sample width in pixels."),
                io.Int.Input("height", default=512, min=64, max=2048, step=16, tooltip="Sample height in pixels."),
                io.Int.Input("every_n_steps", default=250, min=1, max=100000,
                             tooltip="Render the set every this many steps (250 is usual) and at the end."),
                io.Combo.Input("sampler_name", options=sampling.SAMPLERS, default="euler",
                               tooltip="KSampler's sampler. euler is what FLUX is usually sampled with."),
                io.Combo.Input("scheduler", options=sampling.SCHEDULERS, default="simple",
                               tooltip="KSampler's scheduler. simple (or beta) suits FLUX."),
                io.Boolean.Input("before_training", default=True,
                                 tooltip="Also render the set before the first step: the base model to compare "
                                         "against."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Load CLIP Vision's model (clip_vision_vit_l, SigLIP): scores every render "
                                            "— likeness (how alike the [trigger] prompts' samples and your photos "
                                            "are, mean cosine similarity, higher is better) and drift (how far the "
                                            "class-word and unrelated prompts moved from the base model's samples, "
                                            "1 − cosine, lower is better) — into scores.csv/json, the panel and "
                                            "the loss plot, and names the best checkpoint. Not connected: no "
                                            "scores."),
                io.Float.Input("max_drift", default=scores.DEFAULT_MAX_DRIFT, min=0.01, max=2.0, step=0.01,
                               optional=True,
                               tooltip="The best checkpoint is the highest likeness among those with drift at "
                                       "most this (if none, the least drift). 0.1–0.3; lower keeps the base "
                                       "model's look for everything else."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="For an edit LoRA (FLUX.1 Kontext): the image every prompt edits, as the "
                                       "stock ReferenceLatent node passes it (fitted to width × height). "
                                       "Unconnected: the first control image of the dataset, so the samples show "
                                       "the training edit; use a photo the LoRA has not seen to judge how it "
                                       "generalises."),
            ],
            outputs=[sockets.Validation.Output(display_name="validation")],
        )

    @classmethod
    def execute(cls, prompts, seeds, guidance, sample_steps, width, height, every_n_steps, sampler_name,
                scheduler, before_training, clip_vision=None, max_drift=scores.DEFAULT_MAX_DRIFT,
                reference_image=None) -> io.NodeOutput:
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise ValueError("prompts is empty; write at least one prompt (one per line).")
        grid = itertools.product(lines, number_list(seeds, int, "seeds", "42, 7"),
                                 number_list(guidance, float, "guidance", "3.5, 4.0"),
                                 number_list(sample_steps, int, "sample_steps", "20, 28"))
        entries = tuple(EvalEntry(*e) for e in grid)
        if clip_vision is not None:
            vision.ClipVisionEmbedder(clip_vision)  # a wrong socket, by name, now
            scoring.check([e.prompt for e in entries], max_drift)
        return io.NodeOutput(ValidationPlan(entries, every_n_steps, width, height, sampler_name, scheduler,
                                            before_training, clip_vision, max_drift,
                                            None if reference_image is None else reference_image[:1]))
