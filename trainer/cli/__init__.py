"""`python -m trainer`: the library's command line.

    python -m trainer                      the quickstart (tiny FLUX, bundled photos); --help lists its flags
    python -m trainer config FILE [--json] what a config file sets, what it can't, what is missing
    python -m trainer train --config FILE --model tiny [--set key=value …] [--resume latest]
    python -m trainer train --config FILE --models-dir ~/ComfyUI/models --model flux1-dev.safetensors
    python -m trainer init OUT.yaml        a new recipe: every key with its default and help
    python -m trainer keys [--markdown]    every key of our recipe format
    python -m trainer pretrain --out DIR   the tiny FLUX's weights, pretrained on the shapes world

Exit codes: 0 done, 1 failed (the message says why), 2 an unreadable or unsupported config file
or a bad command line, 130 stopped by Ctrl-C (after writing a checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from .. import quickstart
from ..data.datasets import DatasetError
from ..log import ROOT, logger
from ..recipe.fields import RecipeError
from ..recipe.text import UnreadableConfig
from . import commands, pretrain, train

log = logger(__name__)

SUBCOMMANDS = {"config": commands.add_config, "train": train.add_arguments, "init": commands.add_init,
               "keys": commands.add_keys, "pretrain": pretrain.add_arguments}
EXIT_OK, EXIT_FAILED, EXIT_UNREADABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train FLUX LoRAs without ComfyUI. Without a subcommand: the quickstart (tiny FLUX, the "
                    "bundled photos), whose flags are listed below.",
        epilog="quickstart flags (no subcommand):\n" + "\n".join(
            f"  {a.option_strings[0]:<18} default {a.default}" for a in quickstart.make_parser()._actions
            if a.option_strings and a.dest != "help")
        + "\n\nexit codes: 0 done, 1 failed, 2 unreadable config or bad command line, 130 Ctrl-C")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, add in SUBCOMMANDS.items():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        quickstart.main(argv)  # the quickstart's own flags, exactly as before
        return EXIT_OK
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if logging.getLogger(ROOT).level == logging.NOTSET:  # progress lines show when the root logger is set up
        logging.getLogger(ROOT).setLevel(logging.INFO)   # elsewhere too
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        return args.run(args)
    except UnreadableConfig as e:
        log.error("%s", e)
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        log.error("Interrupted.")
        return EXIT_INTERRUPTED
    except train.Interrupted as e:
        log.error("%s", e)
        return EXIT_INTERRUPTED
    except (RecipeError, DatasetError, ValueError, OSError, FloatingPointError, RuntimeError) as e:
        log.error("Failed: %s", e)
        return EXIT_FAILED
