"""Dataclasses as config sections: their keys, types, defaults and help, read from the classes
themselves, so a field added to a dataclass (TrainConfig gains one) is a key of the format with no
change here.

Help comes from the field's `metadata["help"]`, else from the comment after the field in the
class's source (`steps: int = 1000  # optimizer steps`), else from the caller's table.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from functools import cache
from typing import Any

import yaml

from ..loop.optimizers import parse_args  # kohya's key=value text, as the node reads it

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class RecipeError(ValueError):
    """A setting of a recipe that can't be used, naming its key."""


@dataclass(frozen=True)
class Key:
    """One key of the format: `train.steps`, its type, default and help."""

    path: str
    hint: Any
    default: Any
    help: str


@cache
def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def source_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source: {name: comment}."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+?)\s*$", source, re.M)
    return {name: comment.removeprefix("noqa").strip() for name, comment in found}


def field_help(cls, name: str, extra: dict[str, str] | None = None) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("help") or (extra or {}).get(name) or source_comments(cls).get(name, "")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def is_section(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def item_section(hint):
    """The dataclass of a `list[SomeSection]` field (a list of sections), else None."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is list and args and is_section(args[0]) else None


def keys(cls, prefix: str = "", extra_help: dict[str, dict[str, str]] | None = None) -> list[Key]:
    """Every leaf key of a (nested) dataclass, dotted, in field order; a list of sections is its
    own key and its items' keys as `name[].key`."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint, path = hints(cls)[f.name], f"{prefix}{f.name}"
        if is_section(hint):
            out += keys(hint, f"{path}.", extra_help)
            continue
        table = (extra_help or {}).get(cls.__name__, {})
        out.append(Key(path, hint, to_plain(default_of(f)), field_help(cls, f.name, table)))
        if item_section(hint):
            out += keys(item_section(hint), f"{path}[].", extra_help)
    return out


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(choices)), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def type_name(hint) -> str:
    args = typing.get_args(hint)
    if item_section(hint):
        return "list of groups"
    if hint is dict or typing.get_origin(hint) is dict:
        return "mapping"
    if typing.get_origin(hint) in (list, tuple):
        return f"list of {type_name(args[0])}"
    if typing.get_origin(hint) is typing.Literal:
        return " / ".join(map(str, args))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint, key: str) -> Any:
    """`value` (from YAML, JSON, or text on the command line) as the field's type; a clear error
    naming `key` otherwise. Text is accepted for numbers (PyYAML reads `1e-4` as text)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        match = next((a for a in args if str(a) == str(value).strip()), None)
        if match is None:
            raise RecipeError(f"{key} is {value!r}; choose {', '.join(map(str, args))}.")
        return match
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _text_list(value, args[0])
        elif not isinstance(value, (list, tuple)):
            value = [value]
        items = [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is dict or origin is dict:
        return _mapping(value, key)
    bad = RecipeError(f"{key} is {value!r}; it must be {'a' if hint is not int else 'a whole'} "
                      f"{type_name(hint) if hint is not int else 'number'}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise RecipeError(f"{key} is {value!r}; write true or false.")
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value) if isinstance(value, (int, str)) else _raise(bad)
        except ValueError:
            raise bad from None
    if hint is float:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise RecipeError(f"{key} is {value!r}; give a finite number.")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise bad
        return "" if value is None else str(value)
    return value


def _text_list(text: str, item) -> list:
    """A list typed as text: `[…]` in YAML/JSON flow style; else numbers separated by commas, or
    one text item (prompts hold commas)."""
    if text.strip().startswith("["):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    if item is str:
        return [text] if text.strip() else []
    return [v.strip() for v in text.replace(",", " ").split()]


def _mapping(value: Any, key: str) -> dict:
    """A mapping: as written in YAML/JSON, or as text, `{d_coef: 2}` or kohya's `d_coef=2 betas=0.9,0.99`."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and "=" in v for v in value):
        value = " ".join(value)  # --set optimizer_args=a=1 --set … or a YAML list of pairs
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                pass
        else:
            try:
                value = parse_args(text)
            except ValueError as e:
                raise RecipeError(f"{key}: {e}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{key} is {value!r}; write key=value pairs (d_coef=2 betas=0.9,0.99) or a mapping "
                          "({d_coef: 2}).")
    return {str(k): v for k, v in value.items()}


def _raise(error: Exception):
    raise error


def check(section: str, rules: list[tuple[bool, str]]) -> None:
    """A section's own checks, run when it is built: the first that fails is an error."""
    for ok, message in rules:
        if not ok:
            raise RecipeError(f"{section}.{message}")


def to_plain(value: Any) -> Any:
    """A dataclass (or a field value) as JSON-able dicts, lists and scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


class Reader:
    """Builds dataclasses from nested dicts, writing down which keys took effect and which did not."""

    def __init__(self):
        self.honoured: list[str] = []
        self.unknown: list[tuple[str, str]] = []  # (key, why)
        self.invalid: list[tuple[str, str]] = []  # (key, the error)

    def build(self, cls, data: Any, prefix: str = ""):
        """An instance of `cls` from `data` (a dict; a scalar sets the first field, so
        `timesteps: uniform` reads as `timesteps: {mode: uniform}`)."""
        fields = [f for f in dataclasses.fields(cls) if f.init]
        scalar = not isinstance(data, dict)
        if scalar:
            data = {fields[0].name: data}
        known = {f.name: f for f in fields}
        values, taken = {}, []
        for name, raw in data.items():
            path = prefix.rstrip(".") if scalar else f"{prefix}{name}"
            if name not in known:
                choices = [k.path for k in keys(cls, prefix)] + [f"{prefix}{n}" for n in known]
                self.unknown.append((path, f"not a key of {prefix.rstrip('.') or 'the recipe'}"
                                           f"{suggest(path, choices)}"))
                continue
            hint = hints(cls)[name]
            if is_section(hint):
                before, honoured = len(self.invalid), len(self.honoured)
                values[name] = self.build(hint, raw, f"{path}.")
                taken += self.honoured[honoured:]  # in the order written
                del self.honoured[honoured:]
                if len(self.invalid) > before:
                    values.pop(name)
                continue
            if item_section(hint):
                values[name] = self.build_list(item_section(hint), raw, path, taken)
                continue
            try:
                values[name] = coerce(raw, hint, path)
                taken.append(path)
            except RecipeError as e:
                self.invalid.append((path, str(e)))
        try:
            built = cls(**values)
        except (TypeError, ValueError) as e:
            where = prefix.rstrip(".") or cls.__name__
            self.invalid.append((where, str(e) if str(e).startswith(where) else f"{where}: {e}"))
            return cls()
        self.honoured += taken
        return built

    def build_list(self, cls, raw: Any, path: str, taken: list[str]) -> list:
        """A list of sections (`layers.groups`); text is read as YAML (`--set 'layers.groups=[{…}]'`)."""
        if isinstance(raw, str):
            try:
                raw = yaml.safe_load(raw) if raw.strip() else []
            except yaml.YAMLError as e:
                self.invalid.append((path, f"{path} is not a YAML list: {str(e).splitlines()[0]}."))
                return []
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list):
            self.invalid.append((path, f"{path} is {raw!r}; give a list of groups ({{key: value, …}} each)."))
            return []
        items = []
        for i, item in enumerate(raw):
            before, honoured = len(self.invalid), len(self.honoured)
            built = self.build(cls, item if isinstance(item, dict) else {}, f"{path}[{i}].")
            if not isinstance(item, dict):
                self.invalid.append((f"{path}[{i}]", f"{path}[{i}] is {item!r}; give {{key: value, …}}."))
            taken += self.honoured[honoured:]
            del self.honoured[honoured:]
            if len(self.invalid) == before:
                items.append(built)
        return items
