"""What the readers of other tools' config files share: a `Mapping` that collects our recipe's
settings from a foreign file and writes down, for every key of that file, what became of it.

A reader walks its tool's file and, key by key, calls one of

    m.set("network.linear", "layers.rank", 64)            # honoured: it sets one of our keys
    m.set("train.lr", "train.learning_rate", lr, note="…")   # honoured, with a note for the user
    m.note("model.name_or_path", "load this model in ComfyUI")  # taken note of, no setting
    m.drop("train.xformers", "attention is ComfyUI's own")  # unsupported, with the reason
    m.same("train.batch_size", 1)                           # honoured: what we do anyway

then `m.finish(fmt, source)` builds the `Imported` recipe. A key set to one of our keys the library
does not have (yet) becomes unsupported by itself, so a reader can name the key it means before the
feature lands; a value our format refuses becomes unsupported with the refusal; and a key of the
file the reader never mentioned is reported as unsupported too: none is silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .fields import Reader
from .schema import Recipe, all_keys, value_of


def resolve(value: str, base: Path) -> Path:
    """A path of a config: `~` is the home folder, a relative path is relative to the config."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def is_windows_path(value: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", value)) or value.startswith("\\\\")


def is_examples_file(path: Path) -> bool:
    """An mflux train config (.json) named as a dataset: its `examples` block lists the photos and
    their prompts (what an imported mflux config trains on)."""
    return path.is_file() and path.suffix.lower() == ".json"


def missing_note(setting: str, value: str, path: Path) -> str:
    """What the user reads about a folder of the file that is not here, named by the file's key."""
    where = "a Windows path: the file comes from another machine" if is_windows_path(value) else str(path)
    return f"{setting}: {value!r} does not exist here ({where}); change {setting}."



PATH_KEYS = ("dataset.folders", "dataset.regularisation", "dataset.control_path")


def paths_of(recipe: Recipe, base: Path) -> list[tuple[str, str, Path]]:
    """(key as written, value, resolved path) of every folder the recipe names."""
    out = []
    for key in PATH_KEYS:
        values = value_of(recipe, key)
        for i, value in enumerate(values):
            out.append((key if len(values) == 1 else f"{key}[{i}]", value, resolve(value, base)))
    return out


def missing_paths(recipe: Recipe, base: Path, origins: dict[str, str] | None = None) -> list[str]:
    """A note per folder that does not exist here, naming the setting of the file that gave it
    (ai-toolkit's `folder_path`, …) when the recipe was imported."""
    notes = [] if recipe.dataset.folders else ["dataset.folders is empty: name the folder of your photos to train."]
    for key, value, path in paths_of(recipe, base):
        if not (path.is_dir() or is_examples_file(path)):
            setting = (origins or {}).get(key) or (origins or {}).get(key.split("[")[0], key.split("[")[0])
            notes.append(missing_note(setting, value, path))
    return notes


@dataclass
class Unsupported:
    key: str
    why: str


@dataclass
class Imported:
    """A config file read as a recipe, and what became of each of its keys."""

    format: str
    recipe: Recipe
    source: Path
    honoured: list[str] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # our key -> the file's key that set it

    def summary(self) -> list[str]:
        """What took effect and what did not, as lines for a person (the `config` command, the
        Import Training Config node)."""
        lines = [f"Honoured ({len(self.honoured)}): {', '.join(self.honoured) or 'none'}"]
        lines.append(f"Unsupported ({len(self.unsupported)}):" if self.unsupported else "Unsupported: none")
        lines += [f"  {u.key}: {u.why}" for u in self.unsupported]
        if self.notes:
            lines += ["Notes:", *(f"  {n}" for n in self.notes)]
        return lines

    def as_json(self) -> dict:
        return {"format": self.format, "settings": self.recipe.to_dict(), "honoured": self.honoured,
                "unsupported": [vars(u) for u in self.unsupported], "notes": self.notes}


@cache
def our_keys() -> frozenset[str]:
    return frozenset(k.path for k in all_keys())


def leaves(data: Any, prefix: str = "") -> list[str]:
    """Every leaf key of nested data, dotted as written: `config.process.network.linear`. A list of
    mappings is indexed (`datasets[1].folder_path`) unless it holds just one; a list of scalars (or an
    empty one) is one leaf."""
    if isinstance(data, dict):
        if not data and prefix:
            return [prefix]
        return [leaf for k, v in data.items() for leaf in leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        if len(data) == 1:
            return leaves(data[0], prefix)
        return [leaf for i, v in enumerate(data) for leaf in leaves(v, f"{prefix}[{i}]")]
    return [prefix] if prefix else []


def lookup(data: Any, key: str) -> Any:
    """The value at a dotted key of `leaves` (`a.b[0].c`, or `a.b.c` when `b` holds one); None when absent."""
    node = data
    for part in key.replace("[", ".[").split("."):
        if isinstance(node, list) and len(node) == 1 and not part.startswith("["):
            node = node[0]
        if part.startswith("["):
            index = int(part[1:-1])
            node = node[index] if isinstance(node, list) and index < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


class Mapping:
    """Our recipe's settings, gathered from one foreign file, with the fate of each of its keys."""

    def __init__(self, tool: str):
        self.tool = tool  # how users know it: "ai-toolkit", "mflux", …
        self.settings: dict[str, Any] = {}  # our dotted key → value
        self.origins: dict[str, str] = {}  # our dotted key → the file's key that set it
        self.honoured: list[str] = []
        self.unsupported: list[Unsupported] = []
        self.notes: list[str] = []

    def set(self, key: str, ours: str, value: Any, note: str | None = None) -> bool:
        """The file's `key` sets our `ours` to `value`; False when this pack has no such setting."""
        if ours not in our_keys() and not ours.startswith("layers.groups"):
            self.drop(key, f"this pack has no setting for it yet (it would be {ours})")
            return False
        self.settings[ours] = value
        self.origins[ours] = key
        self._honour(key)
        if note:
            self.notes.append(f"{key}: {note}")
        return True

    def same(self, key: str, note: str | None = None) -> None:
        """The file's `key` asks for what this pack does anyway."""
        self._honour(key)
        if note:
            self.notes.append(f"{key}: {note}")

    def note(self, key: str, text: str) -> None:
        """The file's `key` sets nothing here but is worth telling the user (e.g. the model to load)."""
        self.same(key, text)

    def drop(self, key: str, why: str) -> None:
        """The file's `key` can't be honoured here, and why."""
        if not any(u.key == key for u in self.unsupported):
            self.unsupported.append(Unsupported(key, why))

    def _honour(self, key: str) -> None:
        if key not in self.honoured:
            self.honoured.append(key)

    def finish(self, fmt: str, source: Path, data: Any = None, groups: list[dict] | None = None) -> Imported:
        """The recipe, built by our format's own reader (so its checks apply); a value it refuses
        makes the file's key that set it unsupported. With `data` (the whole file), each of its
        leaf keys the reader never mentioned is reported as unsupported. A section whose own check
        refuses one value is built again without what that key set, so its other keys still apply."""
        while True:
            recipe, refused = self._build(groups)
            forgotten = False
            for ours, why in refused:
                key = self._origin(ours, why)
                if key in self.honoured:
                    self.honoured.remove(key)
                self.drop(key, why)
                settings = [o for o, k in self.origins.items() if k == key and o in self.settings]
                for setting in settings:
                    del self.settings[setting]
                forgotten = forgotten or bool(settings)
            if not forgotten:
                break
        if data is not None:
            self._unmentioned(data)
        return Imported(fmt, recipe, source, self.honoured, self.unsupported, self.notes, origins=self.origins)

    def _build(self, groups: list[dict] | None) -> tuple[Recipe, list[tuple[str, str]]]:
        nested: dict[str, Any] = {}
        for ours, value in self.settings.items():
            node = nested
            *parents, last = ours.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        if groups:
            nested.setdefault("layers", {})["groups"] = groups
        reader = Reader()
        return Recipe.from_dict(nested, reader), reader.unknown + reader.invalid

    def _origin(self, ours: str, why: str) -> str:
        """The file's key behind one of our keys. A section's own check names the field first
        ("steps is -5; …"), which tells which of the section's keys it refused."""
        field_named = f"{ours}.{why.removeprefix(f'{ours}: ').split(' ', 1)[0]}"
        if field_named in self.origins:
            return self.origins[field_named]
        matches = [k for o, k in self.origins.items() if o == ours or o.startswith(f"{ours}.")]
        return matches[0] if len(matches) == 1 else self.origins.get(ours, ours)

    def _unmentioned(self, data: Any) -> None:
        told = set(self.honoured) | {u.key for u in self.unsupported}
        for leaf in leaves(data):
            if not any(leaf == k or leaf.startswith((f"{k}.", f"{k}[")) for k in told):
                self.drop(leaf, f"not a setting this pack knows of {self.tool}'s format")
