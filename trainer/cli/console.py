"""What `train` shows while it runs, besides its log lines: a progress bar on the terminal (tqdm:
step, loss, s/step, ETA, the job's own smoothed figures) and, with `--report-to tensorboard`, the
loss, learning rate, speed and validation samples as TensorBoard events in the run folder."""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..log import logger
from ..outputs.progress import Progress, Sample
from ..recipe.fields import RecipeError

log = logger(__name__)

TENSORBOARD_FOLDER = "tensorboard"


def add_arguments(p) -> None:
    p.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                   help="a progress bar (step, loss, s/step, ETA) or a line every --log-every steps; auto: the bar "
                        "on a terminal, lines otherwise (logs, CI)")
    p.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                   help="also write the loss, learning rate, speed and validation samples as TensorBoard events "
                        f"into the run folder's {TENSORBOARD_FOLDER}/ (needs `pip install tensorboard`)")


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a package blocked, or half-imported
        return False


def check(args) -> None:
    """Before anything is loaded or written: what --report-to needs is installed."""
    if args.report_to == "tensorboard" and not installed("tensorboard"):
        raise RecipeError("--report-to tensorboard: the tensorboard package is not installed. Install it (pip install "
                          "tensorboard), or leave --report-to out.")


def wants_bar(choice: str, log_json: bool) -> bool:
    return choice == "bar" or (choice == "auto" and not log_json and sys.stderr.isatty())


class Console:
    """The bar and the TensorBoard writer of one run; `close()` when it ends."""

    def __init__(self, folder: Path, bar: bool, tensorboard: bool):
        self.bar = None
        self.writer = None
        self._bar_wanted = bar
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / TENSORBOARD_FOLDER))

    def on_progress(self, progress: Progress) -> None:
        if self._bar_wanted:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=progress.total, initial=progress.step - 1, unit="step", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}", file=sys.stderr)
            self.bar.set_postfix_str(bar_text(progress), refresh=False)
            self.bar.update(progress.step - self.bar.n)
        if self.writer is not None:
            for name in ("loss", "loss_smooth", "lr", "seconds_per_step", "peak_memory_gib", "preservation_loss"):
                value = getattr(progress, name)
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", value, progress.step)

    def on_samples(self, step: int, samples: list[Sample]) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for s in samples:
            with Image.open(s.path) as image:
                self.writer.add_image(f"samples/{s.entry:02d}", np.asarray(image.convert("RGB")), step,
                                      dataformats="HWC")

    def on_scores(self, score) -> None:
        """Likeness and drift of a validation step (outputs/scores.py's Score)."""
        if self.writer is not None:
            self.writer.add_scalar("scores/likeness", score.likeness, score.step)
            self.writer.add_scalar("scores/drift", score.drift, score.step)

    def on_done(self, step: int, loss_before: float, loss_after: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("fixed_noise_loss/before", loss_before, step)
            self.writer.add_scalar("fixed_noise_loss/after", loss_after, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    @contextmanager
    def logging_beside_the_bar(self):
        """Log messages printed above the bar rather than through it."""
        if not self._bar_wanted:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.root]):
            yield


def bar_text(p: Progress) -> str:
    eta = time.strftime("%H:%M:%S", time.gmtime(p.eta_seconds))
    return f"loss {p.loss:.4f} (avg {p.loss_smooth:.4f})  {p.seconds_per_step:.2f} s/step  ETA {eta}"
