"""What the readers of an ai-toolkit job's sections share: the `Job` being read (its `Mapping`,
and ai-toolkit's defaults taken for keys the file leaves out), and how keys are spelt."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from ..importing import Mapping, is_windows_path, our_keys
from ..schema import all_keys

TOOL = "ai-toolkit"


def join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def item(base: str, items: list, i: int) -> str:
    """The key of item i of a list of mappings, as `leaves` writes it (no index when it holds one)."""
    return f"{base}[{i}]" if len(items) > 1 else base


def num(value: Any) -> Any:
    """A number as ai-toolkit takes it (text like "1e-4" too); anything else as it is."""
    if isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


@cache
def our_defaults() -> dict[str, Any]:
    return {k.path: k.default for k in all_keys()}


class Job:
    """One ai-toolkit job being read."""

    def __init__(self):
        self.m = Mapping(TOOL)
        self.defaults: list[str] = []  # "train.learning_rate 1e-06 (lr)": ai-toolkit's, for keys left out

    def set(self, key: str, ours: str, value: Any, note: str | None = None) -> bool:
        return self.m.set(key, ours, value, note)

    def planned(self, key: str, ours: str, value: Any, off: Any, note: str | None = None) -> None:
        """A key our pack is to gain (`ours`): set once it exists; until then the value that asks for
        nothing (`off`) is what this pack does, any other is unsupported, naming the key it will be."""
        if ours in our_keys() or value != off:
            self.set(key, ours, value, note)
        else:
            self.m.same(key, note)

    def only(self, key: str, value: Any, fine: tuple, why: str, note: str | None = None) -> None:
        """Honoured when `value` is one of `fine` (what this pack does anyway), else unsupported."""
        if value in fine:
            self.m.same(key, note)
        else:
            self.m.drop(key, why)

    def default(self, ours: str, value: Any, what: str, shown: str | None = None) -> None:
        """ai-toolkit's default (for its key `what`) where the file leaves the key out; `shown`: how
        the note tells the value, when not as written."""
        if ours in self.m.settings:
            return
        self.m.settings[ours] = value
        if value != our_defaults().get(ours):
            self.defaults.append(f"{ours} {shown or repr(value)} ({what})")

    def path(self, key: str, value: Any) -> str:
        """A folder of the file as written; a note when it is relative (ai-toolkit reads it from the
        folder it runs in, this pack from the config's)."""
        value = str(value)
        if not is_windows_path(value) and not Path(value).expanduser().is_absolute():
            self.m.notes.append(f"{key}: {value!r} is relative: read from this file's folder here (ai-toolkit "
                                "reads it from the folder it runs in).")
        return value
