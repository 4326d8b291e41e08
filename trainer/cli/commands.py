"""`config` (what a config file sets) and `keys` (every key of our format)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import files
from ..log import logger
from ..recipe import ai_toolkit, formats, text
from ..recipe.fields import type_name
from ..recipe.schema import ALIASES, Recipe, all_keys

log = logger(__name__)
WRITERS = ("ours", "ai-toolkit")


def add_config(sub) -> None:
    p = sub.add_parser("config", help="print what a config file sets, what it can't, and paths missing here",
                       description="Read a config file (format detected from its content) and print the resolved "
                                   "settings, the keys that took effect and the ones that can't.")
    p.add_argument("file", type=Path, help="the config file (our YAML/JSON recipe)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object: {"format", "settings", "honoured", "unsupported", "notes"}')
    p.add_argument("--write", type=Path, metavar="OUT",
                   help="also write the resolved recipe in our format (OUT.yaml, commented; or OUT.json)")
    p.add_argument("--to", choices=WRITERS, default="ours",
                   help="the format --write writes: ours, or ai-toolkit (a job YAML, with what ai-toolkit can't "
                        "express in a comment at its top)")
    p.set_defaults(run=run_config)


def run_config(args) -> int:
    if args.to != "ours" and not args.write:
        log.error("--to %s says the format --write writes: give --write OUT.yaml too.", args.to)
        return 2
    imported = formats.load(args.file)
    if args.write:
        recipe, out = imported.recipe, args.write
        files.write_text(out, ai_toolkit.write(recipe) if args.to == "ai-toolkit" else text.dump(recipe, out))
        imported.notes.append(f"Wrote the resolved recipe to {args.write}"
                              + (" as an ai-toolkit job." if args.to == "ai-toolkit" else "."))
    if args.json:
        sys.stdout.write(json.dumps(imported.as_json(), indent=1) + "\n")
        return 0
    lines = [f"{args.file}: {imported.format} format", "", "Settings:",
             *("  " + line for line in text.to_yaml(imported.recipe, comments=False).splitlines()), "",
             *imported.summary()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def add_init(sub) -> None:
    p = sub.add_parser("init", help="write a new recipe with every key, its default and its help",
                       description="Write a commented recipe to start from (YAML; JSON for a .json name).")
    p.add_argument("out", type=Path, help="the file to write, e.g. my_recipe.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings to write changed")
    p.add_argument("--force", action="store_true", help="replace the file if it exists")
    p.set_defaults(run=run_init)


def run_init(args) -> int:
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; choose another name, or --force to replace it.")
    recipe = Recipe().with_settings(args.set)
    files.write_text(args.out, text.dump(recipe, args.out))
    log.info("Wrote %s. Set dataset.folders, then: python -m trainer train --config %s --model tiny", args.out,
             args.out)
    return 0


def add_keys(sub) -> None:
    p = sub.add_parser("keys", help="list every key of our recipe format (what --set takes)")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    p.add_argument("--readme", type=Path, metavar="README.md",
                   help="rewrite the table between the file's <!-- recipe-keys:start/end --> markers")
    p.set_defaults(run=run_keys)


def short_names() -> dict[str, str]:
    """Dotted key -> its first short name for --set."""
    return {v: k for k, v in reversed(list(ALIASES.items()))}


def markdown_table() -> str:
    short = short_names()
    rows = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for k in all_keys():
        alias = f" (`--set {short[k.path]}`)" if k.path in short else ""
        rows.append(f"| `{k.path}`{alias} | {type_name(k.hint)} | `{json.dumps(k.default)}` | "
                    f"{k.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def update_readme(path: Path) -> None:
    readme = path.read_text(encoding="utf-8")
    start, end = "<!-- recipe-keys:start -->\n", "<!-- recipe-keys:end -->"
    if start not in readme or end not in readme:
        raise ValueError(f"{path} has no {start.strip()} … {end} markers to put the table between.")
    head, rest = readme.split(start, 1)
    files.write_text(path, head + start + markdown_table() + end + rest.split(end, 1)[1])
    log.info("Wrote the recipe keys table into %s.", path)


def run_keys(args) -> int:
    if args.readme:
        update_readme(args.readme)
        return 0
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    width = max(len(k.path) for k in all_keys())
    short = short_names()
    for k in all_keys():
        alias = f" [{short[k.path]}]" if k.path in short else ""
        sys.stdout.write(f"{k.path:<{width}}  {json.dumps(k.default):<14} {k.help}{alias}\n")
    return 0
