"""Writing files so that nothing is ever half-written, and names that stay inside their folder.

Every file the pack writes goes through `atomic_write`: the content goes to a temporary file
beside the target, is flushed to disk (fsync), given the mode any new file gets (0644 under the
usual umask 022, so other programs read it), and renamed over the target, and the folder's entry
is flushed too. A crash or a kill at any moment leaves
either the old file or the new one, never a mix. Folders of files (checkpoints) are written with
`write_synced` into a hidden folder that is renamed into place as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
NAME_BYTES = 255  # the longest file or folder name most file systems take
_NOT_IN_NAMES = set('<>:"|?*')  # Windows refuses these; a workflow made on Linux must load there too


def file_mode() -> int:
    """The mode a plain new file gets (0o666 less the umask: 0644 usually), rather than the 0600 of
    temporary files, so other programs (Forge, a second ComfyUI, a file browser) read what we write."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it (thread-safe)
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _disk_full(path: Path, error: OSError) -> OSError:
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f", {shutil.disk_usage(where).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return OSError(errno.ENOSPC, f"Disk full: could not write {path}{free}. Free some space on that disk "
                                 "(or write the run elsewhere) and resume from the last checkpoint.")


@contextlib.contextmanager
def reporting_disk_full(path: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC) into an error that says so, and where."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC and not str(e).startswith("Disk full"):
            raise _disk_full(path, e) from e
        raise


def check_writable(folder: str | Path, need_bytes: int = 0, what: str = "The output folder") -> None:
    """Before training: `folder` can be created and written, and its disk has `need_bytes` free.
    Writes nothing that stays (a probe file in the nearest existing folder, removed at once)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {folder} can't be created: {existing} is a file, not a folder. "
                                 "Choose another output folder.")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(folder, e) from e
        raise PermissionError(f"{what} {folder} is not writable ({existing}: {e.strerror}); choose a folder you "
                              "can write to, or fix its permissions.") from e
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"Disk full: {what.lower()} {folder} has {free / 2**20:.0f} MiB free, and "
                                    f"this run's checkpoints and LoRA need about {need_bytes / 2**20:.0f} MiB. Free "
                                    "some space or write the run elsewhere.")


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
    with reporting_disk_full(path):
        write(path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    os.chmod(path, file_mode())
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(temporary_path)` so that it appears whole or not at all."""
    path = Path(path)
    with reporting_disk_full(path):
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


def _shown(name) -> str:
    """A name as an error quotes it: at most 60 characters."""
    return repr(name) if len(repr(name)) <= 60 else repr(name[:40]) + f"… ({len(name)} characters)"


def safe_path(root: str | Path, name: str) -> Path:
    """`root/name`, refusing names that are empty, absolute, climb out of `root` (by `..` or a link),
    or that some file system would refuse or mangle: NUL and control characters, `<>:"|?*`, Windows
    device names (`CON`, `nul.txt`), parts ending in a dot or space, parts over 255 bytes. Unicode
    is kept, in its composed form (NFC), so `é` is one name on every system."""
    if not isinstance(name, str):
        raise ValueError(f"The file name {_shown(name)} is not text; give one like 'my_lora' or 'people/alice'.")
    clean = unicodedata.normalize("NFC", name.strip().replace("\\", "/"))
    parts = clean.split("/")
    if not clean or parts[-1] in ("", ".", ".."):
        raise ValueError(f"The file name {_shown(name)} has no name part; give one like 'my_lora' or 'people/alice'.")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":") or ".." in parts:
        raise ValueError(f"The file name {_shown(name)} leaves the {Path(root).name} folder; use a plain name or "
                         "a subfolder like 'people/alice' (no '..', no absolute paths).")
    for part in parts:
        bad = sorted({c for c in part if c in _NOT_IN_NAMES or unicodedata.category(c) == "Cc"})
        if bad:
            raise ValueError(f"The file name {_shown(name)} contains {', '.join(map(repr, bad))}, which file systems "
                             "refuse; use letters, digits, '-', '_' and '/' for subfolders.")
        if part.split(".")[0].upper().rstrip() in WINDOWS_RESERVED or part != part.rstrip(". ") and part != ".":
            raise ValueError(f"The file name {_shown(name)} has the part {part!r}, which Windows reserves or changes "
                             "(device names like CON, NUL, COM1; a trailing dot or space); choose another name.")
        if len(part.encode("utf-8")) > NAME_BYTES:
            raise ValueError(f"The file name {_shown(name)} has a part of {len(part.encode('utf-8'))} bytes; file "
                             f"systems take at most {NAME_BYTES}. Choose a shorter name.")
    root = Path(root).resolve()
    resolved = (root / clean).resolve()
    if root not in resolved.parents:
        raise ValueError(f"The file name {_shown(name)} resolves outside {root} (through a link); choose another.")
    return resolved
