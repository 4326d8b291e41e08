"""Encoding a dataset once: VAE latents and text embeddings, cached in memory (for as long as
ComfyUI runs) and, when asked, on disk (across restarts).

A key covers everything a result depends on: the image's content (not its name), its bucket and
crop, the augmentation and view, the caption, and the identity of the encoder that made it. Change
any of these and it is computed again; change none and it is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
from PIL import Image
from safetensors.torch import load_file

from .. import files
from ..families.conditioning import Text
from ..log import logger
from . import images
from .captions import preservation_caption, shuffled_tags
from .datasets import Dataset, DatasetError, DatasetItem

log = logger(__name__)

@dataclass
class Example:
    """One training image, encoded: model-space latents (C, h, w), text tokens (L, D), and for families
    that read one (FLUX.1) the pooled CLIP vector (D,), else None.
    `views` are extra latents of the same image (augmented), `texts` extra caption variants (tag
    shuffles), `dropout_text` the trigger-only caption used with probability `dropout_rate`; each
    with the caption it encodes. `preserve` holds each of these captions with the trigger word
    replaced by the class word, in the order (caption, *texts, dropout_text), for differential output
    preservation; empty: none."""

    latents: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor | None
    caption: str = ""
    source: str = ""
    repeats: int = 1
    loss_weight: float = 1.0
    views: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    dropout_text: tuple | None = None
    dropout_rate: float = 0.0
    key: str = ""  # the image's content hash (as the encode cache keys it): a checkpoint notices a changed dataset
    regularisation: bool = False  # a regularisation or class image, not the subject's
    subject: str = ""  # the subject's trigger word: which subject this photo shows
    preserve: list = field(default_factory=list)  # class captions, for differential output preservation
    preserved_captions: list = field(default_factory=list)  # the class captions `preserve` encodes, in order
    shuffled_captions: list = field(default_factory=list)  # the captions `texts` encode, in order
    dropout_caption: str = ""  # the caption `dropout_text` encodes (a trained text encoder encodes them live)
    network_weight: float = 1.0  # the LoRA's multiplier on this photo (ai-toolkit's per-dataset network_weight)
    controls: list = field(default_factory=list)  # an edit pair's source latents, one per view ([latents, *views])

    @property
    def control(self) -> torch.Tensor | None:
        """The edit's source latents (Kontext), for the plain view; None for a plain photo."""
        return self.controls[0] if self.controls else None

    def control_of(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The source latents shaped as `latents` (one of this example's views: `batches.choose`)."""
        if not self.controls:
            return None
        return self.controls[next(i for i, v in enumerate([self.latents, *self.views]) if v is latents)]

    def copied(self) -> "Example":
        """With copies of every tensor: tensors made under inference_mode can't join autograd."""
        pair = lambda t: (t[0].clone(), None if t[1] is None else t[1].clone())  # noqa: E731
        return replace(self, latents=self.latents.clone(), context=self.context.clone(),
                       pooled=None if self.pooled is None else self.pooled.clone(),
                       views=[v.clone() for v in self.views], texts=[pair(t) for t in self.texts],
                       controls=[c.clone() for c in self.controls],
                       dropout_text=pair(self.dropout_text) if self.dropout_text else None,
                       preserve=[pair(t) for t in self.preserve])


class Encoders(Protocol):
    """What turns images and captions into model inputs (ComfyUI's VAE/CLIP, or diffusers'). A run
    that trains the text encoders gets them separately, as a lora.text_encoder.TrainableText."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 16, H/8, W/8) latents as the transformer sees them."""

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """caption -> (text tokens (L, D), pooled vector (D,) or None where the family reads none)."""

    def identity(self) -> dict[str, str]:
        """Fingerprints of the image and text encoders ('images', 'text'), for cache keys."""


_MEMORY: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # shared by all runs in this process
MEMORY_ENTRIES = 8192
TAG_SHUFFLES = 4


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def weights_fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """Identifies a model by its architecture and a sample of its weights (cheap even for T5-XXL)."""
    state = module.state_dict()
    h = hashlib.sha256(f"{type(module).__qualname__}|{extra}".encode())
    for name in sorted(state):
        h.update(f"{name}{tuple(state[name].shape)}{state[name].dtype}".encode())
    names = sorted(k for k, v in state.items() if v.numel())
    for name in (names[0], names[len(names) // 2], names[-1]) if names else ():
        h.update(state[name].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class EncodeCache:
    def __init__(self, folder: Path | None = None, memory: bool = True):
        self.folder, self.memory = folder, memory
        self.hits = self.misses = 0

    def get(self, k: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.memory and k in _MEMORY:
            _MEMORY.move_to_end(k)
            self.hits += 1
            return _MEMORY[k]
        path = self.folder / k[:2] / f"{k}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            value = load_file(str(path))
            self.hits += 1
        else:
            value = {n: t.detach().float().cpu().contiguous() for n, t in compute().items()}
            self.misses += 1
            if path is not None:
                files.write_safetensors(path, value, {})
        if self.memory:
            _MEMORY[k] = value
            while len(_MEMORY) > MEMORY_ENTRIES:
                _MEMORY.popitem(last=False)
        return value


def clear_memory() -> None:
    _MEMORY.clear()


def _size(item: DatasetItem) -> tuple[int, int]:
    if item.pixels is not None:
        return item.pixels.shape[1], item.pixels.shape[0]
    return images.size(item.image)


def plan(dataset: Dataset) -> tuple[list[tuple[DatasetItem, tuple[int, int]]], list[str]]:
    """Each item's bucket, from the image headers only: every size problem is known before any
    encoding. Problems of items that skip them are returned; the others raise, all at once."""
    planned, skipped, errors = [], list(dataset.skipped), []
    for item in dataset.items:
        try:
            planned.append((item, item.shaping.bucket(*_size(item), item.name)))
        except images.ImageProblem as e:
            (skipped if item.skip_problems else errors).append(str(e))
    if errors:
        raise DatasetError(f"{len(errors)} image(s) can't be used at their training resolution:\n  "
                           + "\n  ".join(errors))
    if not planned:
        raise DatasetError("No image is left to train on: " + "; ".join(skipped))
    return planned, skipped


def check_preservation(dataset: Dataset, dop_class: str) -> None:
    """Before anything is encoded: differential output preservation needs, for every subject, a
    trigger word to replace and a class word to put in its place (`dop_class`, else the subject's)."""
    subjects = {(i.trigger_word.strip(), i.class_word.strip()) for i in dataset.items if not i.regularisation}
    if not any(trigger for trigger, _ in subjects):
        raise DatasetError("dop_multiplier is on, but the dataset has no trigger word: differential output "
                           "preservation teaches a trigger word without changing what the class word means. Set "
                           "a trigger word, or set dop_multiplier to 0.")
    missing = sorted(trigger for trigger, word in subjects if trigger and not (dop_class.strip() or word))
    if missing:
        raise DatasetError(f"dop_multiplier is on, but the subject(s) {', '.join(map(repr, missing))} have no class "
                           "word to put in place of the trigger word; set dop_class (e.g. 'person', ai-toolkit's "
                           "diff_output_preservation_class) or the dataset's class_word.")


def encode_dataset(dataset: Dataset, encoders: Encoders, cache: EncodeCache | None = None, seed: int = 0,
                   on_progress: Callable[[int, int], None] | None = None,
                   dop_class: str | None = None) -> tuple[list[Example], list[str]]:
    """Every image, view and caption variant encoded once (or found in the cache). Returns the
    examples and the problems that were skipped. With `dop_class` (TrainConfig.preservation_class():
    '' = each subject's class word, None = no differential output preservation) the subjects' captions
    are also encoded with the trigger word replaced by the class word."""
    cache = cache or EncodeCache(memory=False)
    if dop_class is not None:
        check_preservation(dataset, dop_class)
    planned, skipped = plan(dataset)
    ids = encoders.identity()

    def text(caption: str) -> Text:
        def compute():
            return {n: t for n, t in zip(("context", "pooled"), encoders.encode_text(caption)) if t is not None}
        got = cache.get(key("text", ids["text"], caption), compute)
        return got["context"], got.get("pooled")

    examples = []
    for n, (item, bucket) in enumerate(planned):
        content, opened = item.content_key(), []

        def latents_of(view: int) -> dict[str, torch.Tensor]:
            def compute():
                if not opened:
                    opened.append(images.open_rgb(item.image, bucket) if item.image else
                                  images.from_tensor(item.pixels))
                out = {"latents": shaped(opened[0], view)}
                if item.control is not None:  # the edit's source: at the target's size, then the same crop
                    control = images.open_rgb(item.control, bucket).resize(opened[0].size, Image.LANCZOS)
                    out["control"] = shaped(control, view)
                return out

            def shaped(image, view: int) -> torch.Tensor:
                generator = torch.Generator().manual_seed(int(key(seed, content, view)[:12], 16))
                pixels = item.shaping.apply(image, bucket, generator if view else None)
                return encoders.encode_images(item.augment.apply(pixels, view, generator)[None])[0]
            # view 0 is the plain photo: the same whatever the seed and augmentation
            varies = (item.augment.flip, item.augment.color_jitter, seed) if view else None
            shaping = replace(item.shaping, minimum_image_size=0)  # the minimum changes which photos, not pixels
            return cache.get(key("latents", ids["images"], content, bucket, shaping, varies, view), compute)

        encoded = [latents_of(v) for v in range(item.augment.view_count(item.shaping.crop == "random"))]
        views = [e["latents"] for e in encoded]
        controls = [e["control"] for e in encoded] if item.control is not None else []
        shuffles = shuffled_tags(item.caption, 1, TAG_SHUFFLES, seed) if item.augment.shuffle_tags else []
        context, pooled = text(item.caption)
        dropout = item.augment.caption_dropout
        class_captions = []
        if dop_class is not None and not item.regularisation and item.trigger_word.strip():
            word = dop_class.strip() or item.class_word
            class_captions = [preservation_caption(c, item.trigger_word, word, item.class_word)
                              for c in [item.caption, *shuffles] + ([item.trigger] if dropout else [])]
        preserve = [text(c) for c in class_captions]
        examples.append(Example(views[0], context, pooled, item.caption, item.name, item.repeats, item.loss_weight,
                                views[1:], [text(c) for c in shuffles], text(item.trigger) if dropout else None,
                                dropout, key=content, regularisation=item.regularisation,
                                subject="" if item.regularisation else item.trigger_word, preserve=preserve,
                                preserved_captions=class_captions,
                                shuffled_captions=list(shuffles), dropout_caption=item.trigger if dropout else "",
                                network_weight=item.network_weight, controls=controls))
        if on_progress:
            on_progress(n + 1, len(planned))
    log.info("Encoded %d images (%d from the cache, %d computed).", len(examples), cache.hits, cache.misses)
    if skipped:
        log.warning("Left out of training:\n  %s", "\n  ".join(skipped))
    release = getattr(encoders, "release", None)
    if release:
        release()  # encoded: the VAE and text encoders leave the GPU for the rest of the run
    return examples, skipped
