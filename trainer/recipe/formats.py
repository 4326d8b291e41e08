"""Config formats, told apart by their content: ours, and the tools our users come from.

A format is a `Format` in `FORMATS`: a `detect(data, syntax)` that recognises its files and a
`read(data, source)` that turns one into an `Imported` recipe, with every key of the file either
honoured, or listed as unsupported with the reason: ours, and those of ai-toolkit, mflux,
SimpleTuner and diffusers' flags (each in its own module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import ai_toolkit, diffusers_args, mflux, simpletuner, text
from .fields import Reader
from .importing import Imported, Unsupported, missing_paths
from .schema import Recipe
from .text import UnreadableConfig


@dataclass(frozen=True)
class Format:
    name: str
    title: str  # how users know it
    detect: Callable[[Any, str], bool]
    read: Callable[[Any, Path], Imported]


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


SECTIONS = ("dataset", "layers", "train", "save", "validation")


def _is_ours(data, syntax) -> bool:
    return isinstance(data, dict) and bool(_keys(data) & set(SECTIONS))


def read_ours(data: dict, source: Path) -> Imported:
    reader = Reader()
    recipe = Recipe.from_dict(data, reader)
    unsupported = [Unsupported(k, why) for k, why in reader.unknown + reader.invalid]
    return Imported("ours", recipe, source, reader.honoured, unsupported)


FORMATS: list[Format] = [
    Format("ai-toolkit", "an ai-toolkit job YAML", _is_ai_toolkit, ai_toolkit.read),
    Format("mflux", "an mflux train config", _is_mflux, mflux.read),
    Format("simpletuner", "a SimpleTuner config.json or data-backend file", _is_simpletuner, simpletuner.read),
    Format("diffusers", "a diffusers train_dreambooth_lora_flux.py argument list", _is_diffusers,
           diffusers_args.read),
    Format("ours", "a recipe of this pack", _is_ours, read_ours),
]


def detect(data: Any, syntax: str) -> Format | None:
    return next((f for f in FORMATS if f.detect(data, syntax)), None)


def load(path: str | Path) -> Imported:
    """Read a config file of any known format; `UnreadableConfig` when it can't be used at all."""
    path = Path(path).expanduser()
    return loads(text.read_text(path), path)


def loads(content: str, source: Path) -> Imported:
    """Read a config given as text (pasted into a node); `source` names it, and its folder is where
    the config's relative paths start."""
    data, syntax = text.parse(content, str(source))
    found = detect(data, syntax)
    if found is None:
        raise UnreadableConfig(f"{source} is not a training config this pack knows: expected a recipe with sections "
                               f"{', '.join(SECTIONS)} (see `python -m trainer keys`), or "
                               + ", ".join(f.title for f in FORMATS if f.name != "ours") + ".")
    imported = found.read(data, source)
    imported.notes += missing_paths(imported.recipe, source.parent, imported.origins)
    return imported
