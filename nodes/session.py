"""A training run inside the Train node, as a job.

The loop runs on its own thread. Everything that touches ComfyUI stays in the node's (executor)
thread: the progress bar, the console line, websocket events, rendering validation samples with
ComfyUI's sampler, saving checkpoints. The loop pauses at each checkpoint or sample step and
waits while the node thread works, so training never shares the model with a render.

Stop (the panel's button) ends the run early but normally: outputs, final checkpoint, samples.
Cancel (ComfyUI's) ends it within a step, saves a checkpoint, and aborts the prompt.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from dataclasses import dataclass, field

import comfy.model_management
import comfy.utils
import torch
from tqdm.auto import tqdm

from ..trainer import checkpoints, export, report
from ..trainer.lora import LoraSet
from ..trainer.train import Trainer, fixed_noise_loss
from . import host
from .validation import RenderStopped

log = logging.getLogger("flux_dreambooth")
EVAL_IMAGES = 4  # the fixed-noise loss (steadier than the per-step loss) is measured on these

_running: dict[str, "TrainingSession"] = {}
_one_at_a_time = threading.Lock()


def request_stop(node_id: str | None = None) -> int:
    """Ask running trainings (one node, or all) to stop after the current step; returns how many."""
    sessions = [s for k, s in list(_running.items()) if node_id in (None, k)]
    for s in sessions:
        s.graceful_stop = True
        s.stop.set()
    return len(sessions)


def running_runs() -> list[str]:
    return [s.job.run.path.name for s in list(_running.values())]


@dataclass
class Job:
    """Everything a session needs, prepared by the Train node."""

    node_id: str
    backend: object
    patcher: object
    examples: list
    config: object
    targets: list
    lora_dtype: torch.dtype
    run: checkpoints.RunFolder
    run_plan: object
    resume: object
    renderer: object
    validation: object
    meta: dict = field(default_factory=dict)  # trigger_word, base_model, spec, extra


@dataclass
class Outcome:
    lora: LoraSet
    losses: list
    steps_done: int
    stopped: bool
    loss_before: float
    loss_after: float
    samples: list
    images: list
    history: list


class TrainingSession:
    def __init__(self, job: Job):
        self.job = job
        self.stop = threading.Event()
        self.graceful_stop = False
        self.trainer: Trainer | None = None
        self.messages: queue.Queue = queue.Queue()
        self.resume_loop = threading.Event()
        self.error: BaseException | None = None
        self.loss_before = self.loss_after = float("nan")
        self.samples: list[report.Sample] = []
        self.latest_images: list[torch.Tensor] = []  # the newest render only: earlier ones are on disk
        self.saved_step = checkpoints.step_of(job.resume) if job.resume else -1
        self.tracker = report.ProgressTracker(job.config.steps, job.backend.device)
        self.samples += report.load_samples(job.run.path)  # a resumed run's earlier samples

    # ----- the training thread -------------------------------------------------------------
    def _work(self) -> None:
        job = self.job
        try:
            with torch.inference_mode(False), torch.enable_grad():
                owned = [e.copied() for e in job.examples]
                lora = LoraSet(job.targets, job.lora_dtype, job.config.seed).to(job.backend.device)
                trainer = Trainer(job.backend, lora, owned, job.config)
                if job.resume is not None:
                    trainer.load_state(checkpoints.load_state(job.resume))
                self.trainer = trainer
                probe = owned[:EVAL_IMAGES]
                self.loss_before = fixed_noise_loss(job.backend, trainer.result_lora(), probe, job.config.guidance,
                                                    should_stop=self.stop.is_set)
                self._pause()  # samples before training
                while trainer.step < job.config.steps and not self.stop.is_set():
                    if trainer.run(self._next_pause(trainer.step), self._report, self.stop.is_set):
                        break
                    if trainer.step < job.config.steps:
                        self._pause()
                if not self.stop.is_set() or self.graceful_stop:
                    self.loss_after = fixed_noise_loss(job.backend, trainer.result_lora(), probe, job.config.guidance)
        except BaseException as e:  # raised again in the node's thread
            self.error = e

    def _report(self, info) -> None:
        self.messages.put(("step", info))

    def _pause(self) -> None:
        """Hand the node thread a quiet moment (samples, checkpoint) and wait for it to finish."""
        self.resume_loop.clear()
        if self.stop.is_set():  # stopping: the node thread will not serve a pause any more
            return
        self.messages.put(("pause", None))
        self.resume_loop.wait()

    def _next_pause(self, step: int) -> int:
        every = [self.job.run_plan.save_every] + ([self.job.validation.every] if self.job.validation else [])
        return min((step // n + 1) * n for n in every)

    # ----- the node's thread -------------------------------------------------------------------
    def run(self) -> Outcome:
        if not _one_at_a_time.acquire(blocking=False):
            raise RuntimeError("Another FLUX DreamBooth training is running in this ComfyUI: let it finish, or "
                               "Stop it, before starting this one.")
        _running[self.job.node_id] = self
        try:
            return self._run()
        finally:
            _running.pop(self.job.node_id, None)
            _one_at_a_time.release()
            self.trainer = None
            gc.collect()
            comfy.model_management.soft_empty_cache()

    def _run(self) -> Outcome:
        job = self.job
        thread = threading.Thread(target=self._work, name="flux-dreambooth-train", daemon=True)
        bar = comfy.utils.ProgressBar(job.config.steps)
        console = tqdm(total=job.config.steps, desc="FLUX LoRA", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        if job.backend.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(job.backend.device)
        self._status("training")
        thread.start()
        try:
            self._serve(thread, bar, console)
            if self.error is not None:
                raise self.error
            self._finish_files(render=True)
        except BaseException as e:
            self._abort(thread, e)
            raise
        finally:
            console.close()
        self._status("stopped" if self.stop.is_set() else "done")
        trainer = self.trainer
        return Outcome(trainer.result_lora().cpu(), trainer.losses, trainer.step, self.stop.is_set(),
                       self.loss_before, self.loss_after, self.samples, self.latest_images, self.tracker.history)

    def _serve(self, thread: threading.Thread, bar, console) -> None:
        """Until the loop ends: show its steps, serve its pauses, watch for Cancel."""
        while thread.is_alive() or not self.messages.empty():
            try:
                kind, info = self.messages.get(timeout=0.1)
            except queue.Empty:
                kind = None
            if kind == "step":
                self._show_step(info, bar, console)
            elif kind == "pause":
                try:
                    self._at_pause()
                finally:
                    self.resume_loop.set()
            comfy.model_management.throw_exception_if_processing_interrupted()

    def _abort(self, thread: threading.Thread, error: BaseException) -> None:
        """Cancel or a failure: stop the loop, keep what can be kept, say what happened."""
        self.stop.set()
        self.resume_loop.set()
        thread.join()
        cancelled = isinstance(error, comfy.model_management.InterruptProcessingException)
        try:  # never hide the error that got us here
            self._finish_files(render=False, checkpoint=not isinstance(error, FloatingPointError))
        except Exception:
            log.exception("Could not write the run's files after %s", type(error).__name__)
        step = self.trainer.step if self.trainer else 0
        self._status("cancelled" if cancelled else "error",
                     f"Cancelled at step {step}." if cancelled else f"{type(error).__name__}: {error}")

    def _show_step(self, info, bar, console) -> None:
        progress = self.tracker.update(info.step, info.loss, info.lr)
        bar.update_absolute(info.step, info.total)  # also raises if Cancel was pressed
        console.n = info.step
        console.set_postfix_str(f"loss {progress.loss:.4f} (avg {progress.loss_smooth:.4f}) lr {progress.lr:.1e} "
                                f"peak {progress.peak_memory_gib:.1f} GiB {progress.memory_device}", refresh=False)
        console.refresh()
        if self.messages.empty() or info.step == info.total:  # behind? skip to the newest
            host.send_event("flux_dreambooth.progress", {"node": self.job.node_id, **vars(progress)})
        if info.step % self.job.run_plan.plot_every == 0:
            self._write_plots()

    def _at_pause(self) -> None:
        step, config = self.trainer.step, self.job.config
        if not self.tracker.history and self.trainer.losses:  # a resumed run: plot from its first step
            self.tracker.replay(self.trainer.losses, [config.learning_rate * config.lr_factor(i)
                                                      for i in range(len(self.trainer.losses))])
        if step > 0 and step % self.job.run_plan.save_every == 0:
            self._save_checkpoint()
        validation = self.job.validation
        if validation and ((step == 0 and validation.before_training) or (step > 0 and step % validation.every == 0)):
            self._render()
        self.tracker.restart_clock()

    def _save_checkpoint(self) -> None:
        trainer, job = self.trainer, self.job
        if trainer is None or trainer.step in (0, self.saved_step):
            return
        meta = export.metadata(job.meta["spec"], trainer.step, job.meta["trigger_word"], job.meta["base_model"],
                               extra=job.meta["extra"])
        state = {**trainer.state(), **checkpoints.describe(job.meta["spec"], job.backend.dims)}
        path = job.run.save(trainer.step, export.kohya_state_dict(trainer.result_lora()), meta, state,
                            keep=job.run_plan.keep_last)
        self.saved_step = trainer.step
        log.info("Checkpoint %s", path)
        host.send_event("flux_dreambooth.checkpoint", {"node": job.node_id, "step": trainer.step,
                                                       "path": str(path.relative_to(host.runs_root()))})

    def _render(self) -> None:
        trainer, job = self.trainer, self.job
        if trainer is None or any(s.step == trainer.step for s in self.samples):  # done (before a resume)
            return
        host.send_event("flux_dreambooth.rendering", {"node": job.node_id, "step": trainer.step,
                                                      "count": len(job.validation.entries)})
        with_lora = host.apply_lora(job.patcher, export.kohya_state_dict(trainer.result_lora()), 1.0)
        try:
            samples, images = job.renderer.render(with_lora, trainer.step, should_stop=self.stop.is_set)
        except RenderStopped:  # Stop pressed mid-render: the final render at the stop step follows
            return
        finally:
            host.load_for_training(job.patcher)  # the LoRA's patches come off before training goes on
        self.samples += samples
        self.latest_images = [images]
        report.save_samples(job.run.path, self.samples)
        host.send_event("flux_dreambooth.samples", {
            "node": job.node_id, "step": trainer.step, "labels": [s.label for s in samples],
            "images": [host.output_reference(s.path) for s in samples]})

    def _finish_files(self, render: bool, checkpoint: bool = True) -> None:
        """At the end, however it came: the last checkpoint, last samples, grid, strip, plots."""
        if self.trainer is None:
            return
        if checkpoint:
            self._save_checkpoint()
        if render and self.job.validation:
            self._render()
        if self.samples:
            report.sample_grid(self.samples).save(self.job.run.path / "grid.png")
            report.progress_strip(self.samples, self.job.run.path / "progress.gif")
        self._write_plots()

    def _write_plots(self) -> None:
        if self.tracker.history:
            report.write_history(self.job.run.path, self.tracker.history)
            report.loss_plot(self.tracker.history).save(self.job.run.path / "loss.png")

    def _status(self, state: str, message: str = "") -> None:
        host.send_event("flux_dreambooth.status", {"node": self.job.node_id, "state": state, "message": message,
                                                   "run": self.job.run.path.name})
