"""Run training on its own thread while the node waits.

The executor thread keeps the parts of ComfyUI that are not thread-safe: it moves the progress bar
(which also reads the Cancel flag) and turns Cancel into a stop request the loop checks every step.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import comfy.model_management
import comfy.utils
import torch

log = logging.getLogger("flux_dreambooth")

_one_at_a_time = threading.Lock()


class BackgroundJob:
    """`work(stop, report)` runs on a thread with autograd on; `report(step)` moves the bar."""

    def __init__(self, work: Callable[[threading.Event, Callable[[int], None]], object], total: int,
                 name: str = "flux-dreambooth-train"):
        self.work, self.total, self.name = work, total, name
        self.stop = threading.Event()
        self.step = 0
        self.result = None
        self.error: BaseException | None = None

    def _target(self):
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self.result = self.work(self.stop, self._report)
        except BaseException as e:  # handed to the waiting thread, which raises it
            self.error = e

    def _report(self, step: int) -> None:
        self.step = step

    def run(self):
        if not _one_at_a_time.acquire(blocking=False):
            raise RuntimeError("A FLUX DreamBooth training is already running in this ComfyUI; wait for it to "
                               "finish or cancel it before starting another.")
        try:
            return self._run()
        finally:
            _one_at_a_time.release()

    def _run(self):
        bar = comfy.utils.ProgressBar(self.total)
        thread = threading.Thread(target=self._target, name=self.name, daemon=True)
        thread.start()
        shown = -1
        try:
            while thread.is_alive():
                thread.join(timeout=0.1)
                if self.step != shown:
                    shown = self.step
                    bar.update_absolute(shown, self.total)
                comfy.model_management.throw_exception_if_processing_interrupted()
        except BaseException:
            log.info("Stopping training (cancelled at step %d of %d).", self.step, self.total)
            self.stop.set()
            thread.join()
            raise
        if self.error is not None:
            raise self.error
        return self.result
