"""Recipes as text: a config file read into plain data (JSON, YAML or an argument list), and a
recipe written back as a commented YAML file (or JSON) that reads back to the same recipe."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import yaml

from . import fields
from .schema import EXTRA_HELP, Recipe


class UnreadableConfig(ValueError):
    """A config file that can't be opened or parsed: the `config` and `train` commands exit 2."""


def read_text(path: str | Path) -> str:
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UnreadableConfig(f"Config file {path} does not exist.") from None
    except IsADirectoryError:
        raise UnreadableConfig(f"{path} is a folder; give the config file inside it.") from None
    except PermissionError:
        raise UnreadableConfig(f"Config file {path} can't be read (permission denied).") from None
    except UnicodeDecodeError:
        raise UnreadableConfig(f"Config file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as e:
        raise UnreadableConfig(f"Config file {path} can't be read: {e.strerror or e}.") from None


def parse(text: str, name: str = "the config") -> tuple[Any, str]:
    """(data, syntax): JSON, else YAML, else a command-line argument list (`--key value` lines)."""
    try:
        return json.loads(text), "json"
    except json.JSONDecodeError as e:
        json_error = e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        data, yaml_error = None, e
    else:
        if isinstance(data, (dict, list)):
            return data, "yaml"
        yaml_error = None
    if "--" in text:
        return text, "args"
    if text.lstrip().startswith(("{", "[")):
        raise UnreadableConfig(f"{name} is not valid JSON: {json_error}.")
    if yaml_error is not None:
        raise UnreadableConfig(f"{name} is not valid YAML or JSON: {str(yaml_error).splitlines()[0]} "
                               f"({str(yaml_error).splitlines()[-1].strip()}).")
    raise UnreadableConfig(f"{name} holds no settings (a YAML or JSON mapping of keys, e.g. `train: {{steps: 1000}}`).")


def _scalar(value: Any) -> str:
    """A value as YAML that PyYAML and YAML 1.2 readers both read back exactly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        if e and exponent[0] not in "+-":
            exponent = "+" + exponent
        return mantissa + (f"e{exponent}" if e else "")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):  # a flow mapping: {betas: [0.9, 0.99], d_coef: 2}
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_scalar(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # a double-quoted YAML scalar


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 100 - len(indent))] if text else []


def _section(obj: Any, indent: str, comments: bool) -> list[str]:
    lines = []
    cls = type(obj)
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if comments:
            lines += _comment(fields.field_help(cls, f.name, EXTRA_HELP.get(cls.__name__)), indent)
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{f.name}:", *_section(value, indent + "  ", comments)]
        elif fields.item_section(fields.hints(cls)[f.name]) and value:
            lines.append(f"{indent}{f.name}:")
            for item in value:
                item_lines = _section(item, indent + "    ", False)
                lines += [f"{indent}  - {item_lines[0].strip()}", *item_lines[1:]]
        else:
            lines.append(f"{indent}{f.name}: {_scalar(fields.to_plain(value))}")
    return lines


def to_yaml(recipe: Recipe, comments: bool = True) -> str:
    """The recipe as our YAML format, every key written, each after its help as a comment."""
    lines = ["# FLUX DreamBooth recipe (comfyui-flux-dreambooth). Train it with:",
             "#   python -m trainer train --config THIS_FILE --models-dir ~/ComfyUI/models --model FILE",
             "# (or --model tiny: the embedded tiny FLUX, to try it)", ""] if comments else []
    for f in dataclasses.fields(recipe):
        lines += [f"{f.name}:", *_section(getattr(recipe, f.name), "  ", comments), ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2) + "\n"


def dump(recipe: Recipe, path: str | Path) -> str:
    """The text `write` puts in `path`: JSON for a .json name, commented YAML otherwise."""
    return to_json(recipe) if str(path).lower().endswith(".json") else to_yaml(recipe)


def loads(text: str, name: str = "the recipe") -> Recipe:
    """Our format's text (YAML or JSON) as a recipe; any unknown key or bad value is an error."""
    data, syntax = parse(text, name)
    if not isinstance(data, dict):
        raise UnreadableConfig(f"{name} is not a recipe: it holds a {syntax} {type(data).__name__}, not sections.")
    return Recipe.from_dict(data)
