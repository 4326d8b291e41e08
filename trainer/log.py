"""One logging tree for the library and the nodes: `flux_dreambooth.<module>`, whatever folder
the pack was installed under (ComfyUI names the package after its folder)."""

from __future__ import annotations

import logging

ROOT = "flux_dreambooth"


def logger(module: str) -> logging.Logger:
    """The logger of a module, from its `__name__`: '<pack>.trainer.loop.job' ->
    'flux_dreambooth.trainer.loop.job', 'trainer.data.encode' -> 'flux_dreambooth.trainer.data.encode'."""
    parts = module.split(".")
    for anchor in ("trainer", "nodes"):
        if anchor in parts:
            return logging.getLogger(".".join([ROOT, *parts[parts.index(anchor):]]))
    return logging.getLogger(f"{ROOT}.{parts[-1]}")
