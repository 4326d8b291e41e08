"""Likeness and drift, per checkpoint, and the best checkpoint: the maths and the run folder's files.

An image embedder (CLIP-ViT-L, SigLIP: ComfyUI's CLIP_VISION; `PooledPixels` for the toy) turns
images into vectors; two scores are cosine similarities between them:

  likeness  mean cosine similarity between the embeddings of the samples of the subject prompts
            (the validation prompts that name the trigger) and those of the training photos, over
            every (sample, photo) pair. Higher: the samples look more like the photos.
  drift     mean of 1 − cosine similarity between each class-prompt sample (the trigger replaced
            by the class word, plus a few unrelated prompts) with the LoRA and the frozen base
            model's sample of the same prompt and seed. 0: the LoRA leaves them as the base had
            them; higher: it bleeds into everything ("every person becomes the subject").

Best checkpoint: the highest likeness among the checkpoints whose drift is at most `max_drift`;
when none is, the one with the least drift (said so). Steps without a checkpoint on disk don't count.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .. import files

SCORES_CSV, SCORES_JSON = "scores.csv", "scores.json"
COLUMNS = ("step", "likeness", "drift")
DEFAULT_MAX_DRIFT = 0.2
# prompts with no subject in them: a LoRA that changes these has bled into the whole model
UNRELATED_PROMPTS = ("a bowl of fruit on a wooden table", "a city street at night, rain", "a mountain lake at sunrise")

ImageEmbedder = Callable[[torch.Tensor], torch.Tensor]  # images (N, H, W, 3) in [0, 1] -> embeddings (N, D)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.detach().float().flatten(1), dim=1)


def likeness(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over every (sample, reference) pair of embeddings (N, D) and (M, D)."""
    return float((_unit(samples) @ _unit(references).T).mean())


def drift(samples: torch.Tensor, base: torch.Tensor) -> float:
    """Mean of 1 − cosine similarity between each sample's embedding and its base sample's (same row)."""
    if samples.shape != base.shape:
        raise ValueError(f"drift needs one base sample per sample: {tuple(samples.shape)} vs {tuple(base.shape)}")
    return float((1 - (_unit(samples) * _unit(base)).sum(1)).mean())


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3), as ComfyUI's IMAGE, from that or from (N, 3, H, W)."""
    return images if images.shape[-1] == 3 else images.permute(0, 2, 3, 1)


def quantized(images: torch.Tensor) -> torch.Tensor:
    """As an 8-bit PNG holds them, so scores from a render and from its file agree."""
    return (images.float().clamp(0, 1) * 255).round() / 255


class PooledPixels:
    """A fixed embedder for the tiny model and CPU tests only: each image average-pooled to
    `size`×`size`, centred, flattened. It knows nothing of faces or objects; on real models use a
    CLIP vision model."""

    def __init__(self, size: int = 8):
        self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = channels_last(images).float().permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(x, self.size).flatten(1)
        return pooled - pooled.mean(1, keepdim=True)


@dataclass(frozen=True)
class Score:
    step: int
    likeness: float
    drift: float

    def text(self) -> str:
        return f"step {self.step} (likeness {self.likeness:.3f}, drift {self.drift:.3f})"


@dataclass(frozen=True)
class Best:
    score: Score
    within: bool  # its drift is at most max_drift (else: the least drift of all, none was within)
    max_drift: float

    def line(self) -> str:
        why = "" if self.within else f"; no checkpoint has drift ≤ {self.max_drift:g}, this one drifts least"
        return f"best checkpoint: {self.score.text()}{why}"


def best(rows: Iterable[Score], checkpoint_steps: Iterable[int], max_drift: float = DEFAULT_MAX_DRIFT
         ) -> Best | None:
    """The highest likeness among checkpoints with drift ≤ max_drift, else the least drift."""
    saved = set(checkpoint_steps)
    candidates = [r for r in rows if r.step in saved]
    if not candidates:
        return None
    within = [r for r in candidates if r.drift <= max_drift]
    if within:
        return Best(max(within, key=lambda r: (r.likeness, -r.step)), True, max_drift)
    return Best(min(candidates, key=lambda r: (r.drift, -r.likeness)), False, max_drift)


def write_scores(folder: Path, rows: list[Score], chosen: Best | None = None) -> None:
    """scores.csv (step, likeness, drift) and scores.json ({"rows": [...], "best": {...} or null,
    "max_drift": …}), each written atomically."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(COLUMNS)
    writer.writerows((r.step, f"{r.likeness:.6f}", f"{r.drift:.6f}") for r in rows)
    files.write_text(folder / SCORES_CSV, table.getvalue())
    files.write_json(folder / SCORES_JSON, {
        "rows": [asdict(r) for r in rows],
        "best": None if chosen is None else {**asdict(chosen.score), "within_max_drift": chosen.within},
        "max_drift": chosen.max_drift if chosen else None}, indent=1)


def load_scores(folder: Path) -> list[Score]:
    path = folder / SCORES_JSON
    if not path.is_file():
        return []
    try:
        return [Score(int(r["step"]), float(r["likeness"]), float(r["drift"]))
                for r in json.loads(path.read_text(encoding="utf-8"))["rows"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a scores file this pack wrote ({e}); move it away to score afresh.") from None


def best_step(folder: Path) -> int | None:
    """The step scores.json names as the best checkpoint, if any."""
    try:
        chosen = json.loads((folder / SCORES_JSON).read_text(encoding="utf-8")).get("best")
    except (OSError, ValueError):
        return None
    return int(chosen["step"]) if isinstance(chosen, dict) and "step" in chosen else None
