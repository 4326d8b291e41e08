"""Settings typed as text: number lists like '512, 1024' or '3.5 3.6 3.8'."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", int, float)


def number_list(text: str, kind: Callable[[str], T], setting: str, example: str = "3.5, 4.0") -> list[T]:
    """'512, 1024' -> [512, 1024]; errors name the setting and show an example."""
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{setting} is {text!r}; give numbers separated by commas, e.g. '{example}'.") from None
    if not values:
        raise ValueError(f"{setting} is empty; give at least one value, e.g. '{example}'.")
    return values
