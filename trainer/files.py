"""Writing files so that nothing is ever half-written, and names that stay inside their folder.

Every file the pack writes goes through `atomic_write`: the content goes to a temporary file
beside the target, is flushed to disk (fsync), made readable by other programs (0644), and renamed
over the target, and the folder's entry is flushed too. A crash or a kill at any moment leaves
either the old file or the new one, never a mix. Folders of files (checkpoints) are written with
`write_synced` into a hidden folder that is renamed into place as a whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

FILE_MODE = 0o644  # other programs (Forge, a second ComfyUI, a file browser) read what we write


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders can't be opened; NTFS orders its metadata itself
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(path)`, then flush the file to disk and make it readable by others."""
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(temporary_path)` so that it appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write_synced(Path(tmp), write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, value, indent: int | None = None) -> Path:
    return write_text(path, json.dumps(value, indent=indent))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_image(path: str | Path, image, format: str = "PNG", **options) -> Path:
    """A PIL image (or animation, with save_all=True in `options`)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format=format, **options))


def safe_path(root: str | Path, name: str) -> Path:
    """`root/name`, refusing names that are empty, absolute, or climb out of `root`."""
    clean = name.strip().replace("\\", "/")
    parts = clean.split("/")
    if not clean or parts[-1] in ("", ".", ".."):
        raise ValueError(f"The file name {name!r} has no name part; give one like 'my_lora' or 'people/alice'.")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":") or ".." in parts:
        raise ValueError(f"The file name {name!r} leaves the {Path(root).name} folder; use a plain name or "
                         "a subfolder like 'people/alice' (no '..', no absolute paths).")
    root = Path(root).resolve()
    resolved = (root / clean).resolve()
    if root not in resolved.parents:
        raise ValueError(f"The file name {name!r} resolves outside {root} (through a link); choose another.")
    return resolved
