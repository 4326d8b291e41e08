"""A training command as people keep it: a shell script or a README's `accelerate launch …`, read as a
shell would into the script's flags.

`\\` at a line's end continues it, `#` starts a comment, `export NAME=value` (or `NAME=value`) sets a
variable that a later `$NAME` or `${NAME}` uses. The flags are the ones after the script's name
(`train.py`); those before it belong to the launcher (accelerate's). A text of flags alone, one or
several to a line, is read too. `--flag=value` and `--flag value` both work; a flag in `switches`
(argparse's store_true) never takes a value.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from .text import UnreadableConfig

_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class Command:
    script: str = ""  # the script's file name, "" for a text of flags alone
    flags: dict[str, Any] = field(default_factory=dict)  # name (no dashes) -> text, or True for a switch
    launcher: dict[str, Any] = field(default_factory=dict)  # the launcher's flags, the same way
    strays: list[str] = field(default_factory=list)  # words after the script that no flag takes


def parse(text: str, switches: frozenset[str] | set[str] = frozenset(), name: str = "the file") -> Command:
    command, env = Command(), {}
    for number, line in enumerate(re.sub(r"\\\r?\n", " ", text).splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UnreadableConfig(f"{name}, line {number}: {e} (a quote left open?): {line.strip()[:80]!r}.") from None
        if words[:1] == ["export"]:
            words = words[1:]
        while words and _ASSIGNMENT.match(words[0]):
            variable, _, value = words.pop(0).partition("=")
            env[variable] = _expand(value, env)
        words = [_expand(w, env) for w in words]
        script = next((i for i, w in enumerate(words) if w.endswith(".py") and not w.startswith("-")), None)
        if script is not None:
            command.script = words[script].replace("\\", "/").rsplit("/", 1)[-1]
            _flags(words[:script], command.launcher, [], switches)
            _flags(words[script + 1:], command.flags, command.strays, switches)
        elif words[:1] and words[0].startswith("--"):
            _flags(words, command.flags, command.strays, switches)
    return command


def _expand(word: str, env: dict[str, str]) -> str:
    """$NAME and ${NAME} of the variables set so far; others are left as written."""
    return _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), word)


def _flags(words: list[str], into: dict[str, Any], strays: list[str], switches) -> None:
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            strays.append(word)
            continue
        flag, equals, value = word[2:].partition("=")
        if equals:
            into[flag] = value
        elif flag in switches:
            into[flag] = True
        elif i < len(words) and not words[i].startswith("--"):
            into[flag], i = words[i], i + 1
        else:
            into[flag] = None  # a flag that needs a value and has none
