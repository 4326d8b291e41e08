"""Config formats, told apart by their content: ours, and the tools our users come from.

A format is a `Format` in `FORMATS`: a `detect(data, syntax)` that recognises its files and a
`read(data, source)` that turns one into an `Imported` recipe, with every key of the file either
honoured, or listed as unsupported with the reason. Readers for mflux, ai-toolkit, SimpleTuner and
diffusers' flags plug in here; until theirs exists, their files are recognised and refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import text
from .fields import Reader
from .importing import Imported, Unsupported
from .schema import Recipe, value_of
from .text import UnreadableConfig


@dataclass(frozen=True)
class Format:
    name: str
    title: str  # how users know it
    detect: Callable[[Any, str], bool]
    read: Callable[[Any, Path], Imported] | None = None  # None: recognised, not read yet


def _keys(data: Any) -> set[str]:
    return {str(k) for k in data} if isinstance(data, dict) else set()


def _is_ai_toolkit(data, syntax) -> bool:
    keys = _keys(data)
    process = data.get("process") or (data.get("config") or {}).get("process") if keys else None
    return "job" in keys or isinstance(process, list)


def _is_mflux(data, syntax) -> bool:
    return bool(_keys(data) & {"training_loop", "lora_layers", "examples", "instrumentation"})


def _is_simpletuner(data, syntax) -> bool:
    keys = _keys(data)
    backends = isinstance(data, list) and data and all(isinstance(d, dict) and "type" in d and
                                                       ({"instance_data_dir", "id"} & d.keys()) for d in data)
    return bool(backends) or any(k.startswith("--") for k in keys) or "model_family" in keys


def _is_diffusers(data, syntax) -> bool:
    return syntax == "args" and any(flag in data for flag in ("--pretrained_model_name_or_path",
                                                              "--instance_data_dir", "--instance_prompt"))


def _read_simpletuner(data, source: Path) -> Imported:
    from . import simpletuner  # imported when used: it reads paths with this module's helpers

    return simpletuner.read(data, source)


SECTIONS = ("dataset", "layers", "train", "save", "validation")


def _is_ours(data, syntax) -> bool:
    return isinstance(data, dict) and bool(_keys(data) & set(SECTIONS))


def read_ours(data: dict, source: Path) -> Imported:
    reader = Reader()
    recipe = Recipe.from_dict(data, reader)
    unsupported = [Unsupported(k, why) for k, why in reader.unknown + reader.invalid]
    return Imported("ours", recipe, source, reader.honoured, unsupported)


FORMATS: list[Format] = [
    Format("ai-toolkit", "an ai-toolkit job YAML", _is_ai_toolkit),
    Format("mflux", "an mflux train config", _is_mflux),
    Format("simpletuner", "a SimpleTuner config.json or data-backend file", _is_simpletuner, _read_simpletuner),
    Format("diffusers", "a diffusers train_dreambooth_lora_flux.py argument list", _is_diffusers),
    Format("ours", "a recipe of this pack", _is_ours, read_ours),
]


def detect(data: Any, syntax: str) -> Format | None:
    return next((f for f in FORMATS if f.detect(data, syntax)), None)


def load(path: str | Path) -> Imported:
    """Read a config file of any known format; `UnreadableConfig` when it can't be used at all."""
    path = Path(path).expanduser()
    data, syntax = text.parse(text.read_text(path), str(path))
    found = detect(data, syntax)
    if found is None:
        raise UnreadableConfig(f"{path} is not a training config this pack knows: expected a recipe with sections "
                               f"{', '.join(SECTIONS)} (see `python -m trainer keys`), or "
                               + ", ".join(f.title for f in FORMATS if f.name != "ours") + ".")
    if found.read is None:
        raise UnreadableConfig(f"{path} looks like {found.title} (format {found.name!r}): reading it is not yet "
                               "supported. Write the recipe in this pack's format for now "
                               "(`python -m trainer keys` lists its keys).")
    imported = found.read(data, path)
    imported.notes += missing_paths(imported.recipe, path.parent, imported.origins)
    return imported


PATH_KEYS = ("dataset.folders", "dataset.regularisation")


def resolve(value: str, base: Path) -> Path:
    """A path of a config: `~` is the home folder, a relative path is relative to the config."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def paths_of(recipe: Recipe, base: Path) -> list[tuple[str, str, Path]]:
    """(key as written, value, resolved path) of every folder the recipe names."""
    out = []
    for key in PATH_KEYS:
        values = value_of(recipe, key)
        for i, value in enumerate(values):
            out.append((key if len(values) == 1 else f"{key}[{i}]", value, resolve(value, base)))
    return out


def is_windows_path(value: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", value)) or value.startswith("\\\\")


def missing_paths(recipe: Recipe, base: Path, origins: dict[str, str] | None = None) -> list[str]:
    """A note per folder that does not exist here, naming the setting of the file that gave it
    (ai-toolkit's `folder_path`, …) when the recipe was imported."""
    notes = [] if recipe.dataset.folders else ["dataset.folders is empty: name the folder of your photos to train."]
    for key, value, path in paths_of(recipe, base):
        if path.is_dir():
            continue
        setting = (origins or {}).get(key.split("[")[0], key.split("[")[0])
        where = "a Windows path: the file comes from another machine" if is_windows_path(value) else str(path)
        notes.append(f"{setting}: {value!r} does not exist here ({where}); change {setting}.")
    return notes
