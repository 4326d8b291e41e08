"""Likeness and drift at every validation render (the maths: ../outputs/scores.py).

The job hands the scorer each validation render; the scorer takes the subject prompts' images
from it, renders the drift prompts with the LoRA through the host, and compares them with the
frozen base model's samples of the same prompts and seeds, rendered once (LoRA off) and kept in
the run folder (`scores/base_NN.png`, `scores/base.json`), so a resumed run doesn't render them
again. What the host must offer besides a JobHost:

    render_prompts(lora: LoraSet | None, prompts: list[str], should_stop) -> Tensor (N, H, W, 3) | None
        each prompt (triggers filled in) with the validation seed, guidance and steps; `lora` None:
        the base model as loaded. None if `should_stop()` cut it short.
    on_scores(score: Score, rows: list[Score]) -> None   (optional) show the newest score
    after_embedding() -> None   (optional) put the model back for training (ComfyUI loads the
        vision model onto the device to embed, which may move the transformer off)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .. import files
from ..data import images as photos
from ..data.captions import fill_triggers
from ..data.datasets import Dataset
from ..log import logger
from ..outputs import scores
from ..outputs.progress import to_pixels
from ..outputs.scores import Best, Score

log = logger(__name__)
BASE_FOLDER = "scores"
REFERENCE_SIZE, MAX_REFERENCES = 224, 32  # the photos likeness compares with: CLIP's input size, at most this many


@dataclass
class ScoringPlan:
    """What a run is scored with, prepared by whoever starts it (the Train node, the command line)."""

    embedder: scores.ImageEmbedder
    references: torch.Tensor  # the subjects' training photos as the model sees them: (N, H, W, 3) in [0, 1]
    subject_entries: tuple[int, ...]  # which images of a validation render show the subject
    drift_prompts: tuple[str, ...]  # rendered with and without the LoRA, same seeds
    max_drift: float = scores.DEFAULT_MAX_DRIFT
    render_key: str = ""  # how the host renders them (seed, steps, size…): kept base samples must match it


def drift_prompts(prompts: Sequence[str], triggers: Sequence[str], class_words: Sequence[str]) -> tuple[str, ...]:
    """The validation prompts that name a subject, with its class word in place of its trigger word
    ('a photo of [trigger]' -> 'a photo of person'), then the unrelated prompts; each once."""
    words = [*(c.strip() for c in class_words), *[""] * len(triggers)][:len(triggers)]
    classed = [_once(" ".join(fill_triggers(p, words).split()), words) for p in prompts if names_subject(p)]
    return tuple(dict.fromkeys([p for p in classed if p] + list(scores.UNRELATED_PROMPTS)))


def _once(prompt: str, words: Sequence[str]) -> str:
    """'a photo of toy toy' (from '[trigger] toy') as 'a photo of toy'."""
    for word in filter(None, words):
        prompt = re.sub(rf"\b({re.escape(word)})( \1\b)+", r"\1", prompt)
    return prompt


def names_subject(prompt: str) -> bool:
    return "[trigger" in prompt


def class_words(dataset: Dataset) -> list[str]:
    """Each subject's class word, in the order of `dataset.triggers`."""
    words = {i.trigger_word.strip(): i.class_word for i in dataset.items if not i.regularisation}
    return [words.get(t, "") for t in dataset.triggers]


def reference_images(dataset: Dataset, size: int = REFERENCE_SIZE, limit: int = MAX_REFERENCES) -> torch.Tensor:
    """The subjects' photos (not regularisation sets), each once, centre-cropped to size×size: (N, H, W, 3)."""
    chosen = list({i.content_key(): i for i in dataset.items if not i.regularisation}.values())[:limit]
    if not chosen:
        raise ValueError("Scores need photos of the subject, and the dataset has only regularisation images.")
    out = []
    for item in chosen:
        image = photos.open_rgb(item.image, (size, size)) if item.image else photos.from_tensor(item.pixels)
        out.append(to_pixels(ImageOps.fit(image, (size, size))))
    return torch.stack(out)


def check(prompts: Sequence[str], max_drift: float) -> None:
    """What scoring needs of the validation set, checked before anything is loaded or written."""
    if not any(names_subject(p) for p in prompts):
        raise ValueError("Scores need a validation prompt that names the subject ([trigger]): likeness is "
                         "measured on those; add one, e.g. 'a photo of [trigger]'.")
    if not max_drift > 0:
        raise ValueError(f"max_drift is {max_drift}; use a value above 0 (0.1–0.3; 1 − cosine similarity).")


def plan(embedder: scores.ImageEmbedder, dataset: Dataset, prompts: Sequence[str],
         max_drift: float = scores.DEFAULT_MAX_DRIFT, render_key: str = "") -> ScoringPlan:
    """Scoring for a validation set of `prompts` (in render order, `[trigger]` not yet filled in)."""
    check(prompts, max_drift)
    subject = tuple(i for i, p in enumerate(prompts) if names_subject(p))
    return ScoringPlan(embedder, reference_images(dataset), subject,
                       drift_prompts(prompts, dataset.triggers, class_words(dataset)), max_drift, render_key)


class Scorer:
    def __init__(self, plan: ScoringPlan, folder: Path, resumed_step: int | None):
        self.plan, self.folder = plan, folder
        earlier = scores.load_scores(folder)  # a resumed run's: the steps up to its checkpoint
        self.rows: list[Score] = [r for r in earlier if resumed_step is not None and r.step <= resumed_step]
        self.references: torch.Tensor | None = None  # embedded at the first score, inside a pause
        self.base: torch.Tensor | None = None

    def _base(self, host, should_stop: Callable[[], bool]) -> torch.Tensor | None:
        """The base model's embeddings of the drift prompts: from the run folder, else rendered now."""
        if self.base is not None:
            return self.base
        where, prompts = self.folder / BASE_FOLDER, list(self.plan.drift_prompts)
        paths = [where / f"base_{i:02d}.png" for i in range(len(prompts))]
        wanted = {"prompts": prompts, "render": self.plan.render_key}
        try:
            kept = json.loads((where / "base.json").read_text(encoding="utf-8")) == wanted
        except (OSError, ValueError):
            kept = False
        if kept and all(p.is_file() for p in paths):
            images = torch.stack([_read(p) for p in paths])
        else:
            rendered = host.render_prompts(None, prompts, should_stop)
            if rendered is None:
                return None
            images = scores.quantized(scores.channels_last(rendered.cpu()))
            for image, path in zip(images, paths):
                files.write_image(path, Image.fromarray((image.numpy() * 255).round().astype(np.uint8)))
            files.write_json(where / "base.json", wanted)
        self.base = self.plan.embedder(images)
        return self.base

    def score(self, host, lora, step: int, images: torch.Tensor, should_stop: Callable[[], bool]) -> Score | None:
        """Likeness of this render's subject images, drift of the drift prompts rendered with `lora`."""
        if any(r.step == step for r in self.rows):
            return None
        try:
            return self._score(host, lora, step, images, should_stop)
        finally:
            if hasattr(host, "after_embedding"):
                host.after_embedding()

    def _score(self, host, lora, step: int, images: torch.Tensor, should_stop: Callable[[], bool]) -> Score | None:
        if self.references is None:
            self.references = self.plan.embedder(self.plan.references)
        base = self._base(host, should_stop)
        shifted = None if base is None else host.render_prompts(lora, list(self.plan.drift_prompts), should_stop)
        if shifted is None:
            return None
        rendered = scores.quantized(scores.channels_last(images.cpu()))
        subject = rendered[list(self.plan.subject_entries)]
        row = Score(step, scores.likeness(self.plan.embedder(subject), self.references),
                    scores.drift(self.plan.embedder(scores.quantized(scores.channels_last(shifted.cpu()))), base))
        self.rows = sorted([*self.rows, row], key=lambda r: r.step)
        scores.write_scores(self.folder, self.rows)
        log.info("Scores at step %d: likeness %.3f, drift %.3f", step, row.likeness, row.drift)
        if hasattr(host, "on_scores"):
            host.on_scores(row, self.rows)
        return row

    def finish(self, checkpoint_steps: Sequence[int]) -> Best | None:
        """The best checkpoint, written into scores.json."""
        chosen = scores.best(self.rows, checkpoint_steps, self.plan.max_drift)
        if self.rows:
            scores.write_scores(self.folder, self.rows, chosen)
        return chosen


def _read(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return to_pixels(image)
