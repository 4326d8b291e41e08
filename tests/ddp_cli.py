"""`python -m trainer` on the small tiny FLUX (one block of each kind), for the data-parallel tests:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_cli.py train --config FILE …

Only the model differs from `python -m trainer` (`--model tiny` builds it here with fewer blocks,
the same one tests/test_distributed.py trains in-process), so a run costs seconds on 2 cores."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.cli import train  # noqa: E402
from trainer.families.flux1 import tiny  # noqa: E402


def small_flux():
    return tiny.build(0, double_blocks=1, single_blocks=1)


if __name__ == "__main__":
    model = small_flux()
    train.tiny_model = lambda: model
    sys.exit(cli.main(sys.argv[1:]))
