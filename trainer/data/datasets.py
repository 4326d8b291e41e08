"""Datasets: where the images and their captions come from.

Sources: a folder of images with same-name .txt captions (kohya, SimpleTuner's `textfile`), the
file name as caption, a metadata file (JSON, JSONL or CSV), mflux's `examples` block, or images
from other ComfyUI nodes. Subfolders can be concepts (kohya's `10_sks dog`: repeats, trigger,
class), so several subjects train in one run, each with its own trigger word.

Every problem is reported by file name, with what to do about it, before any training starts:
all at once as an error, or, with problems='skip', listed and left out.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import images
from .augment import Augmentation
from .captions import caption_from_filename, subject_words, with_trigger
from .images import Shaping

CAPTION_SOURCES = ("auto", "txt", "filename", "metadata")
METADATA_FILES = ("metadata.jsonl", "metadata.json", "metadata.csv", "captions.jsonl", "captions.json",
                  "captions.csv")
PROBLEMS = ("stop", "skip")
_CONCEPT = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """A dataset problem, naming the files involved."""


@dataclass(frozen=True, eq=False)
class DatasetItem:
    image: Path | None  # a file, or None with `pixels` from another node
    caption: str
    repeats: int = 1  # how often the image appears per epoch, relative to the others
    trigger: str = ""  # trigger word and class ("sks dog"): what caption dropout keeps
    shaping: Shaping = Shaping()
    augment: Augmentation = Augmentation()
    loss_weight: float = 1.0
    regularisation: bool = False
    skip_problems: bool = False
    pixels: torch.Tensor | None = None  # (H, W, 3) in [0, 1]
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or (self.image.name if self.image else "image")

    def content_key(self) -> str:
        """A hash of the image's content (not its name): the cache key's base, the duplicate check."""
        data = self.image.read_bytes() if self.image else self.pixels.numpy().tobytes()
        return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Dataset:
    items: tuple[DatasetItem, ...]
    trigger_word: str = ""
    source: str = ""
    skipped: tuple[str, ...] = ()  # problems reported and left out (problems='skip')

    def __len__(self):
        return len(self.items)

    def __add__(self, other: "Dataset") -> "Dataset":
        """Train on both: e.g. two subjects with their own trigger words, or a regularisation set."""
        triggers = [t for t in dict.fromkeys((self.trigger_word, other.trigger_word)) if t]
        return Dataset(self.items + other.items, ", ".join(triggers), f"{self.source}; {other.source}",
                       self.skipped + other.skipped)

    def with_items(self, **changes) -> "Dataset":
        """Every item changed alike (e.g. marked as a regularisation set)."""
        return replace(self, items=tuple(replace(i, **changes) for i in self.items))


def read_metadata(folder: Path) -> dict[str, str]:
    """Captions by file name from the folder's metadata file, if it has one."""
    for name in METADATA_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
            if path.suffix == ".csv":
                rows = list(csv.DictReader(text.splitlines()))
            elif path.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                data = json.loads(text)
                rows = [{"file_name": k, "text": v} for k, v in data.items()] if isinstance(data, dict) else data
            return {Path(_pick(r, ("file_name", "image", "file", "filename"), path)).name:
                    _pick(r, ("text", "caption", "prompt"), path) for r in rows}
        except (ValueError, TypeError, KeyError) as e:
            raise DatasetError(f"{path} can't be read as captions: {e}. Use rows of "
                               "{\"file_name\": …, \"text\": …}.") from None
    return {}


def _pick(row: dict, keys: tuple[str, ...], path: Path) -> str:
    for k in keys:
        if k in row:
            return str(row[k])
    raise KeyError(f"a row has none of {', '.join(keys)}")


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path.name} is not UTF-8 text; save the caption as UTF-8.") from None


@dataclass(frozen=True)
class Options:
    """What a dataset node sets for all its images."""

    trigger_word: str = ""
    class_word: str = ""
    repeats: int = 1
    captions: str = "auto"
    default_caption: str = ""
    shaping: Shaping = Shaping()
    augment: Augmentation = Augmentation()
    problems: str = "stop"

    def __post_init__(self):
        if self.repeats < 1:
            raise DatasetError(f"repeats is {self.repeats}; it must be at least 1.")
        if self.captions not in CAPTION_SOURCES:
            raise DatasetError(f"captions is {self.captions!r}; choose one of {', '.join(CAPTION_SOURCES)}.")
        if self.problems not in PROBLEMS:
            raise DatasetError(f"problems is {self.problems!r}; choose 'stop' or 'skip'.")

    @property
    def trigger(self) -> str:
        return subject_words(self.trigger_word, self.class_word)

    def item(self, image: Path | None, caption: str, **extra) -> DatasetItem:
        return DatasetItem(image, with_trigger(caption, self.trigger_word, self.class_word), self.repeats,
                           self.trigger, self.shaping,
                           self.augment, skip_problems=self.problems == "skip", **extra)


def _caption(image: Path, options: Options, metadata: dict[str, str]) -> str | None:
    txt = image.with_suffix(".txt")
    if options.captions in ("auto", "txt") and txt.is_file():
        return _read_txt(txt)
    if options.captions in ("auto", "metadata") and image.name in metadata:
        return metadata[image.name]
    if options.captions == "filename":
        return caption_from_filename(image)
    return options.default_caption or None


def _scan(folder: Path, options: Options) -> tuple[list[DatasetItem], list[str]]:
    metadata = read_metadata(folder) if options.captions in ("auto", "metadata") else {}
    items, problems = [], []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in images.EXTENSIONS):
        problem = images.check(image)
        try:
            caption = None if problem else _caption(image, options, metadata)
        except DatasetError as e:
            problem = str(e)
            caption = None
        if problem:
            problems.append(f"{image.name} {problem}: replace or remove it." if not problem.startswith(image.name)
                            else problem)
        elif caption is None:
            where = {"txt": image.with_suffix(".txt").name, "metadata": "the metadata file"}.get(
                options.captions, f"{image.with_suffix('.txt').name} or a metadata file")
            problems.append(f"{image.name} has no caption in {where}: write one (e.g. \"photo of "
                            f"{options.trigger or 'sks dog'}\"), set default_caption, or use captions='filename'.")
        else:
            items.append(options.item(image, caption))
    return items, problems


def _finish(items: list[DatasetItem], problems: list[str], where: str, options: Options) -> Dataset:
    if problems and options.problems == "stop":
        raise DatasetError(f"{len(problems)} problem(s) in {where}:\n  " + "\n  ".join(problems)
                           + "\n(problems='skip' trains on the rest and lists these.)")
    if not items:
        raise DatasetError(f"{where} holds no usable images ({', '.join(images.EXTENSIONS)}); add 5–20 photos "
                           "of your subject." + (f" Left out: {'; '.join(problems)}" if problems else ""))
    return Dataset(tuple(items), options.trigger_word.strip(), where, tuple(problems))


def from_folder(folder: str | Path, options: Options = Options(), concepts: bool = False) -> Dataset:
    """Images in `folder` with their captions. With `concepts`, each subfolder is a concept named
    like kohya's `10_sks dog` (10 repeats, trigger 'sks', class 'dog'); others use its name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder {folder} does not exist or is not a folder.")
    if not concepts:
        items, problems = _scan(folder, options)
        return _finish(items, problems, str(folder), options)
    datasets = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _CONCEPT.match(sub.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (options.repeats, sub.name)
        trigger, _, class_word = name.partition(" ")
        concept = replace(options, trigger_word=trigger, class_word=class_word or options.class_word, repeats=repeats)
        items, problems = _scan(sub, concept)
        datasets.append(_finish(items, problems, str(sub), concept))
    if not datasets:
        raise DatasetError(f"{folder} has no subfolders to use as concepts (e.g. '10_sks dog'); turn off "
                           "subfolders_as_concepts to use the images in it directly.")
    return sum(datasets[1:], datasets[0])


def from_mflux_config(config_path: str | Path, options: Options = Options()) -> tuple[Dataset, dict]:
    """The `examples` block of an mflux train config (its DreamBooth guide). Returns the dataset and the
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
        problem = "does not exist" if not image.is_file() else images.check(image)
        if problem:
            problems.append(f"{entry['image']} {problem} (looked in {root}).")
        else:
            items.append(options.item(image, str(entry["prompt"])))
    return _finish(items, problems, str(config_path), options), config


def from_images(pixels: torch.Tensor, captions: list[str], options: Options = Options(),
                source: str = "images") -> Dataset:
    """An IMAGE batch from other nodes (B, H, W, 3) and one caption per image, or one for all."""
    if len(captions) not in (1, len(pixels)):
        raise DatasetError(f"There are {len(pixels)} images but {len(captions)} captions; give one caption per "
                           "line for each image, or a single one for all.")
    captions = captions * len(pixels) if len(captions) == 1 else captions
    items = [options.item(None, c, pixels=p.detach().cpu().float().clone(), label=f"{source} #{i + 1}")
             for i, (p, c) in enumerate(zip(pixels, captions))]
    return _finish(items, [], source, options)


def fingerprint(path: str | Path) -> str:
    """Changes when any file under `path` (a folder, or a config file's folder) is added,
    removed, or modified: lets ComfyUI re-read a dataset whose files changed."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return f"missing:{path}"
    stats = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())
    return hashlib.sha1(repr(stats).encode()).hexdigest()
