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
from dataclasses import KW_ONLY, dataclass, replace
from pathlib import Path

import torch

from . import folders, images
from .augment import Augmentation
from .captions import TRIGGER_PLACEHOLDER, caption_from_filename, subject_words, with_trigger
from .images import Shaping

CAPTION_SOURCES = ("auto", "txt", "filename", "metadata")
METADATA_FILES = ("metadata.jsonl", "metadata.json", "metadata.csv", "captions.jsonl", "captions.json",
                  "captions.csv")
PROBLEMS = ("stop", "skip")
_CONCEPT = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """A dataset problem, naming the files involved; `problems` lists them one by one."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


@dataclass(frozen=True)
class Origin:
    """Where a dataset's images came from, as its node or recipe gave it: what a run's recipe writes
    back (recipe/from_run.py). `kind`: folder, mflux (a train config's examples) or images (an
    IMAGE batch, which no file can hold)."""

    kind: str
    path: str  # the folder or config file, resolved; for images, the batch's name
    options: "Options"
    concepts: bool = False


@dataclass(frozen=True, eq=False)
class DatasetItem:
    image: Path | None  # a file, or None with `pixels` from another node
    written: str  # the caption as written (file, metadata, node), `[trigger]` not yet replaced
    repeats: int = 1  # how often the image appears per epoch, relative to the others
    trigger_word: str = ""  # the subject's trigger word ('sks'), put into the caption
    class_word: str = ""  # what the subject is ('dog'): prepended with the trigger, kept by caption dropout
    shaping: Shaping = Shaping()
    augment: Augmentation = Augmentation()
    loss_weight: float = 1.0
    network_weight: float = 1.0  # the LoRA's multiplier while training on it (ai-toolkit's network_weight)
    regularisation: bool = False
    skip_problems: bool = False
    pixels: torch.Tensor | None = None  # (H, W, 3) in [0, 1]
    label: str = ""
    origin: Origin | None = None  # where it came from (set by from_folder, from_mflux_config, from_images)
    control: Path | None = None  # the edit's source image (Kontext pairs, controls.py), shaped as this one

    @property
    def name(self) -> str:
        return self.label or (self.image.name if self.image else "image")

    @property
    def caption(self) -> str:
        """What trains: the written caption with the trigger put in (`with_trigger`). A
        regularisation image never gets a subject's trigger: its caption trains as written, with
        `[trigger]` filled only where the user wrote it."""
        if self.regularisation:
            return self.written.replace(TRIGGER_PLACEHOLDER, self.trigger_word).strip()
        return with_trigger(self.written, self.trigger_word, self.class_word)

    @property
    def trigger(self) -> str:
        """What caption dropout keeps: trigger and class ('sks dog'); for regularisation the class only."""
        return self.class_word.strip() if self.regularisation else subject_words(self.trigger_word, self.class_word)

    def content_key(self) -> str:
        """A hash of the image's content (not its name): the cache key's base, the duplicate check."""
        data = self.image.read_bytes() if self.image else self.pixels.numpy().tobytes()
        if self.control is not None:  # an edit pair: the same target with another source is another example
            data += b"control" + self.control.read_bytes()
        return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Dataset:
    items: tuple[DatasetItem, ...]
    _: KW_ONLY
    source: str = ""
    skipped: tuple[str, ...] = ()  # reported and left out: problems (with problems='skip') and other files

    def __len__(self):
        return len(self.items)

    def __add__(self, other: "Dataset") -> "Dataset":
        """Train on both: e.g. two subjects with their own trigger words, or a regularisation set."""
        return Dataset(self.items + other.items, source=f"{self.source}; {other.source}",
                       skipped=self.skipped + other.skipped)

    @property
    def triggers(self) -> tuple[str, ...]:
        """One trigger word per subject, in the order they were chained (regularisation sets have none):
        `[trigger]` in a validation prompt is the first, `[trigger2]` the second…"""
        return tuple(dict.fromkeys(i.trigger_word.strip() for i in self.items
                                   if not i.regularisation and i.trigger_word.strip()))

    @property
    def trigger_word(self) -> str:
        """The first (or only) subject's trigger word."""
        return next(iter(self.triggers), "")

    def with_items(self, **changes) -> "Dataset":
        """Every item changed alike (e.g. marked as a regularisation set)."""
        return replace(self, items=tuple(replace(i, **changes) for i in self.items))


def metadata_file(folder: Path) -> Path | None:
    """The folder's metadata file (captions by file name), if it has one."""
    return next((folder / n for n in METADATA_FILES if (folder / n).is_file()), None)


def read_metadata(folder: Path) -> dict[str, str]:
    """Captions by file name from the folder's metadata file, if it has one."""
    path = metadata_file(folder)
    if path is not None:
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
        except (ValueError, TypeError, KeyError, AttributeError) as e:
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
    caption_ext: str = "txt"  # the captions' file extension (ai-toolkit's caption_ext: txt, caption)

    def __post_init__(self):
        if not re.fullmatch(r"\.?[A-Za-z0-9_]+", self.caption_ext) or self.caption_ext.lstrip(".").lower() in \
                {e.lstrip(".") for e in images.EXTENSIONS}:
            raise DatasetError(f"caption_ext is {self.caption_ext!r}; give the captions' file extension, e.g. 'txt' "
                               "or 'caption' (not a photo extension).")
        if self.repeats < 1:
            raise DatasetError(f"repeats is {self.repeats}; it must be at least 1.")
        if self.captions not in CAPTION_SOURCES:
            raise DatasetError(f"captions is {self.captions!r}; choose one of {', '.join(CAPTION_SOURCES)}.")
        if self.problems not in PROBLEMS:
            raise DatasetError(f"problems is {self.problems!r}; choose 'stop' or 'skip'.")

    @property
    def caption_suffix(self) -> str:
        return "." + self.caption_ext.lstrip(".")

    @property
    def trigger(self) -> str:
        return subject_words(self.trigger_word, self.class_word)

    def item(self, image: Path | None, caption: str, **extra) -> DatasetItem:
        return DatasetItem(image, caption.strip(), self.repeats, self.trigger_word.strip(), self.class_word.strip(),
                           self.shaping, self.augment, skip_problems=self.problems == "skip", **extra)

    def problem_of(self, item: DatasetItem, size: tuple[int, int]) -> str | None:
        """What keeps a readable image out of training: nothing to condition on, or too small."""
        if not item.caption:
            return (f"{item.name} has an empty caption and there is no trigger word: it has nothing to condition "
                    "on; write a caption, or set trigger_word or default_caption.")
        try:
            item.shaping.bucket(*size, item.name)
        except images.ImageProblem as e:
            return str(e)
        return None


def _caption(image: Path, options: Options, metadata: dict[str, str], listing: folders.Listing) -> str | None:
    txt = listing.caption_of(image)
    if options.captions in ("auto", "txt") and txt:
        return _read_txt(txt)
    if options.captions in ("auto", "metadata") and image.name in metadata:
        return metadata[image.name]
    if options.captions == "filename":
        return caption_from_filename(image)
    return options.default_caption or None


def _named(name: str, problem: str) -> str:
    return problem if problem.startswith(name) else f"{name} {problem}: replace or remove it."


def _scan(folder: Path, options: Options, listing: folders.Listing | None = None
          ) -> tuple[list[DatasetItem], list[str], list[str]]:
    """(items, problems, notes) of one folder: every problem found, none raised."""
    listing = listing or folders.list_folder(folder, METADATA_FILES, options.caption_suffix)
    items, problems, notes = [], list(listing.problems), list(listing.notes)
    notes += [f"{f.name}/ is a folder and is not read (subfolders_as_concepts trains each as a subject)."
              for f in listing.folders]
    metadata = {}
    if options.captions in ("auto", "metadata"):
        try:
            metadata = read_metadata(folder)
        except DatasetError as e:
            problems.append(str(e))
    names = {p.name for p in listing.photos}
    problems += [f"{metadata_file(folder).name} names {name}, which is not in the folder: add it or remove the row."
                 for name in metadata if name not in names]
    problems += [f"{p.name} is a caption without an image (no photo named {p.stem}.*): add the photo or remove "
                 "the caption." for p in listing.orphan_captions()]
    for image in listing.photos:
        size, problem = images.inspect(image)
        try:
            caption = None if problem else _caption(image, options, metadata, listing)
        except DatasetError as e:
            problem, caption = f"{image.name}: {e}", None
        if problem:
            problems.append(_named(image.name, problem))
        elif caption is None:
            txt = f"{image.stem}{options.caption_suffix}"
            where = {"txt": txt, "metadata": "the metadata file"}.get(options.captions, f"{txt} or a metadata file")
            problems.append(f"{image.name} has no caption in {where}: write one (e.g. \"photo of "
                            f"{options.trigger or 'sks dog'}\"), set default_caption, or use captions='filename'.")
        else:
            item = options.item(image, caption)
            problem = options.problem_of(item, size)
            (problems.append(problem) if problem else items.append(item))
    return items, problems, notes


def _finish(items: list[DatasetItem], problems: list[str], notes: list[str], where: str, options: Options,
            origin: Origin | None = None) -> Dataset:
    if problems and options.problems == "stop":
        raise DatasetError(f"{len(problems)} problem(s) in {where}:\n  " + "\n  ".join(problems)
                           + "\n(problems='skip' trains on the rest and lists these.)", tuple(problems))
    if not items:
        message = (f"{where} holds no usable images ({', '.join(images.EXTENSIONS)}); add 5–20 photos of your "
                   "subject." + (f" Left out: {'; '.join(problems + notes)}" if problems or notes else ""))
        raise DatasetError(message)
    if origin is not None:
        items = [replace(i, origin=origin) for i in items]
    return Dataset(tuple(items), source=where, skipped=tuple(problems + notes))


def _folder(folder: str | Path) -> Path:
    if not str(folder).strip():
        raise DatasetError("The dataset folder is empty (''): give the folder that holds your photos; an empty path "
                           "would read the current directory.")
    path = Path(folder).expanduser()
    if path.is_file():
        raise DatasetError(f"Dataset folder {path} is a file, not a folder: give the folder that holds it "
                           f"({path.parent}).")
    if not path.is_dir():
        raise DatasetError(f"Dataset folder {path} does not exist or is not a folder.")
    return path


def from_folder(folder: str | Path, options: Options = Options(), concepts: bool = False) -> Dataset:
    """Images in `folder` with their captions. With `concepts`, each subfolder is a concept named
    like kohya's `10_sks dog` (10 repeats, trigger 'sks', class 'dog'); others use its name.
    Every problem of every folder is reported at once."""
    folder = _folder(folder)
    if not concepts:
        items, problems, notes = _scan(folder, options)
        return _finish(items, problems, notes, str(folder), options, Origin("folder", str(folder.absolute()), options))
    root = folders.list_folder(folder, METADATA_FILES, options.caption_suffix)
    if not root.folders:
        raise DatasetError(f"{folder} has no subfolders to use as concepts (e.g. '10_sks dog'); turn off "
                           "subfolders_as_concepts to use the images in it directly.")
    items, notes = [], list(root.notes)
    problems = list(root.problems) + [
        f"{p.name} is beside the concept folders, in none of them: move it into one (e.g. '10_sks dog/') or remove "
        "it." for p in root.photos]
    problems += [f"{p.name} is a caption without an image: remove it." for p in root.orphan_captions()]
    for sub in root.folders:
        match = _CONCEPT.match(sub.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (options.repeats, sub.name)
        trigger, _, class_word = name.partition(" ")
        concept = replace(options, trigger_word=trigger, class_word=class_word or options.class_word, repeats=repeats)
        found, bad, other = _scan(sub, concept)
        items += found
        problems += [f"{sub.name}/{p}" for p in bad] + ([] if found or bad else [f"{sub.name}/ holds no photos."])
        notes += [f"{sub.name}/{n}" for n in other]
    return _finish(items, problems, notes, str(folder), options,
                   Origin("folder", str(folder.absolute()), options, concepts=True))


def from_mflux_config(config_path: str | Path, options: Options = Options()) -> tuple[Dataset, dict]:
    """The `examples` block of an mflux train config (its DreamBooth guide). Returns the dataset and the
    whole config, whose `lora_layers` and settings callers may use too."""
    if not str(config_path).strip():
        raise DatasetError("The mflux config path is empty: give the path of its JSON file.")
    config_path = Path(config_path).expanduser()
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"mflux config {config_path} does not exist.") from None
    except IsADirectoryError:
        raise DatasetError(f"mflux config {config_path} is a folder: give the path of its JSON file.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"mflux config {config_path} is not valid JSON: {e}.") from None
    examples = config.get("examples") if isinstance(config, dict) else None
    if not isinstance(examples, dict) or not isinstance(examples.get("images"), list):
        raise DatasetError(f"mflux config {config_path} has no `examples` block with `path` and `images`.")
    root = (config_path.parent / Path(str(examples.get("path") or ".")).expanduser()).resolve()
    items, problems = [], []
    for i, entry in enumerate(examples["images"]):
        if not isinstance(entry, dict) or "image" not in entry or "prompt" not in entry:
            problems.append(f"examples.images[{i}] needs both `image` and `prompt`.")
            continue
        image = root / entry["image"]
        size, problem = (None, "does not exist") if not image.is_file() else images.inspect(image)
        if problem:
            problems.append(f"{entry['image']} {problem} (looked in {root}).")
            continue
        item = options.item(image, str(entry["prompt"]))
        problem = options.problem_of(item, size)
        (problems.append(problem) if problem else items.append(item))
    origin = Origin("mflux", str(config_path.absolute()), options)
    return _finish(items, problems, [], str(config_path), options, origin), config


def from_images(pixels: torch.Tensor, captions: list[str], options: Options = Options(),
                source: str = "images") -> Dataset:
    """An IMAGE batch from other nodes (B, H, W, 3) and one caption per image, or one for all."""
    if len(captions) not in (1, len(pixels)):
        raise DatasetError(f"There are {len(pixels)} images but {len(captions)} captions; give one caption per "
                           "line for each image, or a single one for all.")
    captions = captions * len(pixels) if len(captions) == 1 else captions
    items = [options.item(None, c, pixels=p.detach().cpu().float().clone(), label=f"{source} #{i + 1}")
             for i, (p, c) in enumerate(zip(pixels, captions))]
    found = {i: options.problem_of(i, (i.pixels.shape[1], i.pixels.shape[0])) for i in items}
    return _finish([i for i, p in found.items() if not p], [p for p in found.values() if p], [], source, options,
                   Origin("images", source, options))


def fingerprint(path: str | Path) -> str:
    """Changes when any file under `path` (a folder, or a config file's folder) is added,
    removed, or modified: lets ComfyUI re-read a dataset whose files changed."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return f"missing:{path}"
    stats = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
                   if p.is_file() and not any(folders.hidden(part) for part in p.relative_to(folder).parts))
    return hashlib.sha1(repr(stats).encode()).hexdigest()
