"""Training images and their captions: discovery, checks, loading.

Every problem is reported by file name, all at once, with what to do about it, before any
training starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRIGGER_PLACEHOLDER = "[trigger]"


class DatasetError(ValueError):
    """A dataset problem, naming the files involved."""


@dataclass
class Example:
    """One training image, encoded: model-space latents (C, h, w), T5 tokens (L, D), CLIP pooled (D,)."""

    latents: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    caption: str = ""
    source: str = ""
    repeats: int = 1


class Encoders(Protocol):
    """What turns images and captions into model inputs (ComfyUI's VAE/CLIP, or diffusers')."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 16, H/8, W/8) latents as the transformer sees them."""

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """caption -> (T5 tokens (L, D), CLIP pooled (D,))."""


@dataclass(frozen=True)
class DatasetItem:
    image: Path
    caption: str
    repeats: int = 1  # how often the image appears per epoch, relative to the others


@dataclass(frozen=True)
class Dataset:
    items: tuple[DatasetItem, ...]
    trigger_word: str = ""
    source: str = ""

    def __len__(self):
        return len(self.items)

    def __add__(self, other: "Dataset") -> "Dataset":
        """Train on both: e.g. two subjects with their own trigger words."""
        triggers = [t for t in dict.fromkeys((self.trigger_word, other.trigger_word)) if t]
        return Dataset(self.items + other.items, ", ".join(triggers), f"{self.source}; {other.source}")


def with_trigger(caption: str, trigger_word: str) -> str:
    """Put the trigger word in the caption: replace `[trigger]`, or prepend it when missing
    (ai-toolkit's convention; seed 002 writes `kvthvmi_ person, …`)."""
    caption = caption.strip()
    if not trigger_word:
        return caption.replace(TRIGGER_PLACEHOLDER, "").strip()
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger_word)
    if re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption):  # as a word: "asks" is not "sks"
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def _check_image(path: Path) -> str | None:
    """None if the file decodes completely, else what is wrong with it."""
    try:
        with Image.open(path) as im:
            im.load()
    except UnidentifiedImageError:
        return "is not an image PIL can read"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be decoded ({e}); it may be truncated or corrupt"
    return None


def _finish(items: list[DatasetItem], problems: list[str], where: str, trigger_word: str, repeats: int) -> Dataset:
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in {where}:\n  " + "\n  ".join(problems))
    if not items:
        raise DatasetError(f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add 5–20 photos of your subject.")
    if repeats < 1:
        raise DatasetError(f"repeats is {repeats}; it must be at least 1.")
    return Dataset(tuple(DatasetItem(i.image, i.caption, repeats) for i in items), trigger_word.strip(), where)


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path.name} is not UTF-8 text; save the caption as UTF-8.") from None


def from_folder(folder: str | Path, trigger_word: str = "", repeats: int = 1,
                caption_extension: str = ".txt") -> Dataset:
    """Images in `folder` with same-name caption files (photo.jpg + photo.txt)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder {folder} does not exist or is not a folder.")
    items, problems = [], []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = image.with_suffix(caption_extension)
        problem = _check_image(image)
        if problem:
            problems.append(f"{image.name} {problem}: replace or remove it.")
        elif not caption_file.is_file():
            problems.append(f"{image.name} has no caption file {caption_file.name}: write one "
                            f"(e.g. \"photo of {trigger_word or 'sks'} dog\").")
        else:
            try:
                items.append(DatasetItem(image, with_trigger(_read_caption(caption_file), trigger_word)))
            except DatasetError as e:
                problems.append(str(e))
    return _finish(items, problems, str(folder), trigger_word, repeats)


def from_mflux_config(config_path: str | Path, trigger_word: str = "", repeats: int = 1) -> tuple[Dataset, dict]:
    """The `examples` block of an mflux train config (seed 000). Returns the dataset and the
    whole config, whose `lora_layers` and settings callers may use too."""
    config_path = Path(config_path).expanduser()
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"mflux config {config_path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"mflux config {config_path} is not valid JSON: {e}.") from None
    examples = config.get("examples")
    if not isinstance(examples, dict) or not isinstance(examples.get("images"), list):
        raise DatasetError(f"mflux config {config_path} has no `examples` block with `path` and `images`.")
    root = (config_path.parent / examples.get("path", ".")).resolve()
    items, problems = [], []
    for i, entry in enumerate(examples["images"]):
        if not isinstance(entry, dict) or "image" not in entry or "prompt" not in entry:
            problems.append(f"examples.images[{i}] needs both `image` and `prompt`.")
            continue
        image = root / entry["image"]
        problem = "does not exist" if not image.is_file() else _check_image(image)
        if problem:
            problems.append(f"{entry['image']} {problem} (looked in {root}).")
        else:
            items.append(DatasetItem(image, with_trigger(str(entry["prompt"]), trigger_word)))
    return _finish(items, problems, str(config_path), trigger_word, repeats), config


def _rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white rather than on whatever colour they hide."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def fingerprint(path: str | Path) -> str:
    """Changes when any file under `path` (a folder, or a config file's folder) is added,
    removed, or modified: lets ComfyUI re-read a dataset whose files changed."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return f"missing:{path}"
    stats = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())
    return hashlib.sha1(repr(stats).encode()).hexdigest()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB in [0, 1], shape (3, R, R): EXIF orientation applied, center-cropped to a square,
    resized down to the training resolution."""
    with Image.open(path) as im:
        im = _rgb(ImageOps.exif_transpose(im))
        w, h = im.size
        if min(w, h) < resolution:
            raise DatasetError(f"{path.name} is {w}×{h}, smaller than the training resolution {resolution}: "
                               f"lower resolution to {min(w, h) // 16 * 16} or less, or replace the image.")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        pixels = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def check_resolution(dataset: Dataset, resolution: int) -> None:
    """Every image must be at least `resolution` on its short side; all offenders are named."""
    if resolution % 16:
        raise DatasetError(f"resolution is {resolution}; use a multiple of 16 (512 or 1024 for FLUX).")
    small = []
    for item in dataset.items:
        with Image.open(item.image) as im:
            w, h = im.size
        if min(w, h) < resolution:
            small.append((item.image.name, w, h))
    if small:
        fits = min(min(w, h) for _, w, h in small) // 16 * 16
        raise DatasetError(f"{len(small)} image(s) are smaller than the training resolution {resolution}: "
                           f"{', '.join(f'{n} ({w}×{h})' for n, w, h in small)}. Lower resolution to {fits} or "
                           "less, or replace them.")


def encode_dataset(dataset: Dataset, encoders: Encoders, resolution: int, batch_size: int = 4,
                   on_progress: Callable[[int, int], None] | None = None) -> list[Example]:
    """Encode every image once and every distinct caption once."""
    check_resolution(dataset, resolution)
    texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    examples = []
    items = list(dataset.items)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        latents = encoders.encode_images(torch.stack([load_image(i.image, resolution) for i in chunk]))
        for item, lat in zip(chunk, latents):
            if item.caption not in texts:
                texts[item.caption] = encoders.encode_text(item.caption)
            context, pooled = texts[item.caption]
            examples.append(Example(lat.float().cpu(), context.float().cpu(), pooled.float().cpu(),
                                    item.caption, item.image.name, item.repeats))
        if on_progress:
            on_progress(start + len(chunk), len(items))
    return examples
