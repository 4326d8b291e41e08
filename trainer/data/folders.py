"""What a dataset folder holds: photos, their caption files, subfolders, and every other entry
named. Hidden entries (`.ipynb_checkpoints`, `.DS_Store`, macOS's `._photo.jpg`) and `__MACOSX`
are ignored; only regular files are read (a named pipe called `x.jpg` would hang the loader); a
link that leads nowhere (a loop, a deleted target) is reported."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .images import EXTENSIONS

CAPTION_SUFFIX = ".txt"
IGNORED = ("__MACOSX",)


def hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED


@dataclass
class Listing:
    photos: list[Path] = field(default_factory=list)  # regular files with a photo's extension (any case)
    captions: dict[str, Path] = field(default_factory=dict)  # caption files (.txt) by stem
    folders: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # entries that look like photos or captions but can't be read
    notes: list[str] = field(default_factory=list)  # entries left out that are not photos (named, not an error)

    def caption_of(self, photo: Path) -> Path | None:
        """Its caption file: same stem (`IMG_1.JPG` + `IMG_1.txt`), or the same ignoring case."""
        exact = self.captions.get(photo.stem)
        if exact:
            return exact
        return next((p for s, p in self.captions.items() if s.lower() == photo.stem.lower()), None)

    def orphan_captions(self, photos: list[Path] | None = None) -> list[Path]:
        """Caption files with no photo beside them."""
        stems = {p.stem.lower() for p in (self.photos if photos is None else photos)}
        return [p for s, p in sorted(self.captions.items()) if s.lower() not in stems]


def list_folder(folder: Path, known: tuple[str, ...] = (), caption_suffix: str = CAPTION_SUFFIX) -> Listing:
    """The entries of `folder`, sorted by name; `known` names (metadata files) are neither used
    nor reported here. Captions are the files ending in `caption_suffix` (ai-toolkit's caption_ext)."""
    out = Listing()
    caption_suffix = caption_suffix.lower()
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if hidden(entry.name):
                continue
            path, suffix = Path(entry.path), Path(entry.name).suffix.lower()
            looks_used = suffix in EXTENSIONS or suffix == caption_suffix
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if entry.is_symlink() and not path.exists():
                out.problems.append(f"{entry.name} is a link that leads nowhere (a loop, or its target is gone): "
                                    "fix or remove it.")
            elif is_dir:
                out.folders.append(path)
            elif not is_file:
                (out.problems if looks_used else out.notes).append(
                    f"{entry.name} is not a regular file (a pipe, socket or device): only regular files are read.")
            elif suffix in EXTENSIONS:
                out.photos.append(path)
            elif suffix == caption_suffix:
                out.captions[path.stem] = path
            elif entry.name.lower() not in known:
                out.notes.append(f"{entry.name} left out: not a photo ({', '.join(EXTENSIONS)}) or a "
                                 f"{caption_suffix} caption.")
    return out
