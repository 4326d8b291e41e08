"""Edit pairs (FLUX.1 Kontext): each target photo with a same-named source image in a control folder.

As ai-toolkit's `control_path`: the folder holds the images before the edit, named as the photos
after it (`cat.png` in the dataset folder, `cat.jpg` or `cat.png` in the control folder; the
extension may differ). Every photo needs its control, and every control image must be readable:
each problem is named, all at once, before anything is encoded. In encoding, a control image is
resized to its target's size and then shaped with the same bucket and crop (encode.py), so both
show the same part of the scene.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import folders, images
from .datasets import Dataset, DatasetError


def _control_folder(folder: str | Path) -> Path:
    path = Path(str(folder).strip()).expanduser()
    if not str(folder).strip():
        raise DatasetError("control_folder is empty (''): give the folder of source images (the images before the "
                           "edit, named as the photos after it), or leave it unconnected for a plain LoRA.")
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"control_folder {path} {what}: give the folder of source images (ai-toolkit's "
                           "control_path), named as the dataset's photos.")
    return path


def with_controls(dataset: Dataset, control_folder: str | Path) -> Dataset:
    """`dataset` with each photo's control image (DatasetItem.control) from `control_folder`; a
    photo without one, two candidates for one photo, or an unreadable control image is an error
    naming the files, before anything loads."""
    folder = _control_folder(control_folder)
    listing = folders.list_folder(folder)
    by_stem: dict[str, list[Path]] = {}
    for p in listing.photos:
        by_stem.setdefault(p.stem.lower(), []).append(p)
    problems, items = list(listing.problems), []
    for item in dataset.items:
        if item.image is None:
            problems.append(f"{item.name} comes from an IMAGE input, not a file: control images are matched by file "
                            "name; use a dataset folder for edit pairs.")
            continue
        found = by_stem.get(item.image.stem.lower(), [])
        if not found:
            problems.append(f"{item.image.name} has no control image in {folder} (looked for {item.image.stem}.*): "
                            "add the source image under the same name, or remove the photo.")
            continue
        if len(found) > 1:
            problems.append(f"{item.image.name} has {len(found)} control images ({', '.join(p.name for p in found)}) "
                            f"in {folder}: keep one.")
            continue
        _, problem = images.inspect(found[0])
        if problem:
            problems.append(f"control image {found[0]} {problem}: replace it.")
            continue
        items.append(replace(item, control=found[0]))
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) pairing {dataset.source} with control_folder {folder}:\n  "
                           + "\n  ".join(problems), tuple(problems))
    return replace(dataset, items=tuple(items))


def has_controls(dataset: Dataset) -> bool:
    """Whether the dataset is edit pairs (all of it: a mix of pairs and plain photos is refused)."""
    paired = {i.control is not None for i in dataset.items}
    if len(paired) > 1:
        plain = next(i.name for i in dataset.items if i.control is None)
        raise DatasetError(f"Some datasets have a control_folder and some not ({plain} has no control image): an edit "
                           "LoRA (Kontext) trains on pairs only; give every chained dataset its control_folder.")
    return paired == {True}


def variant(base: str, dataset: Dataset) -> str:
    """The architecture a LoRA file names (modelspec `flux-1-kontext-dev/lora`): an edit LoRA trained
    on pairs is Kontext's, else the loaded model's own (`dev`, `schnell`)."""
    return f"kontext-{base}" if has_controls(dataset) else base
