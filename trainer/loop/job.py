"""A training run as a job: the loop on a worker thread, the caller's thread free for the rest.

The worker trains in segments and stops at every pause (a checkpoint to save, validation samples
to render). There it hands the caller's thread a quiet moment and waits, so training never shares
the model with a render. The caller runs `Job.run(host)`: it shows each step, serves the pauses,
writes the run's files, and asks its `JobHost` (ComfyUI's node thread, or the command line) for
what only it can do: render samples, notice Cancel, tell the user.

A job ends in one of four ways:
  done       every step trained: final checkpoint, samples, plots.
  stopped    `request_stop()` (the panel's Stop): ends after the current step, otherwise as done.
  cancelled  the host's `check_cancel()` raised: ends within a step, keeps a checkpoint, renders
             nothing more, and the cancelling exception goes on to the caller.
  error      the loop raised (a NaN loss, out of memory): a checkpoint is kept unless the weights
             are what went wrong, and the error goes on to the caller.
"""

from __future__ import annotations

import queue
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..data.encode import Example
from ..families.backend import FluxBackend
from ..log import logger
from ..lora.targets import LoraTarget
from ..lora.text_encoder import TrainableText
from ..lora.variants import parameter_count
from ..lora.weights import LoraSet
from ..outputs import checkpoints, export, progress
from ..outputs.checkpoints import RunFolder, RunSettings
from ..outputs.progress import Progress, Sample
from .distributed import Ranks
from .probe import PROBE_EXAMPLES, probe_examples  # noqa: F401 (the job's, imported from here)
from .scoring import Scorer, ScoringPlan
from .trainer import StepInfo, TrainConfig, Trainer, check_batch_size, fixed_noise_loss

log = logger(__name__)
_FINAL = "final"  # the worker's last pause, before it lets go of the model
class JobState(str, Enum):
    TRAINING = "training"
    STOPPING = "stopping"  # Stop asked for: finish after this step, with every output
    CANCELLING = "cancelling"  # Cancel or an error: end within this step, keep a checkpoint
    DONE = "done"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    FAILED = "error"


@dataclass(frozen=True)
class ValidationSchedule:
    every: int  # render the evaluation set every this many steps (and at the end)
    before_training: bool  # and once before the first step
    count: int  # images per render


@dataclass
class JobSpec:
    """Everything a job needs, prepared by whoever starts it (the Train node, the command line)."""

    backend: FluxBackend
    examples: list[Example]
    config: TrainConfig
    targets: list[LoraTarget]
    run: RunFolder
    settings: RunSettings
    metadata: export.LoraMetadata
    lora_dtype: torch.dtype = torch.float32
    resume: Path | None = None
    validation: ValidationSchedule | None = None
    text_encoder: TrainableText | None = None  # what the targets' text-encoder part trains on (text_phase.py)
    ranks: Ranks | None = None  # a data-parallel run (distributed.py): only rank 0 writes the run's files
    scoring: ScoringPlan | None = None  # likeness and drift at every validation render (scoring.py)


@dataclass
class Outcome:
    lora: LoraSet  # the weights to save: the EMA when the run kept one
    losses: list[float]
    steps_done: int
    stopped: bool
    loss_before: float
    loss_after: float
    samples: list[Sample]
    images: list[torch.Tensor]  # the newest render's images (earlier ones are on disk)
    history: list[tuple[int, float, float, float]]
    notes: list[str] = field(default_factory=list)  # for the run's summary: e.g. the dataset changed on resume
    kohya: dict[str, torch.Tensor] | None = None  # `lora` as a kohya file, made while the model is as it
    # trained (DoRA's dora_scale is relative to the base weights)
    scores: list = field(default_factory=list)  # likeness and drift per validation step (outputs/scores.py)


class JobHost(Protocol):
    """What a job asks of the place it runs in. Called on the caller's thread only."""

    def check_cancel(self) -> None:
        """Raise to cancel the job (ComfyUI's Cancel); called between everything the job does."""

    def is_cancel(self, error: BaseException) -> bool:
        """Whether `error` is the host's cancel, rather than a failure."""

    def on_status(self, state: JobState, message: str) -> None: ...

    def on_progress(self, progress: Progress, latest: bool) -> None:
        """A step was trained; `latest` is False when newer steps are already waiting."""

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_rendering(self, step: int, count: int) -> None: ...

    def render(self, lora: LoraSet, step: int, should_stop: Callable[[], bool]
               ) -> tuple[list[Sample], torch.Tensor] | None:
        """The evaluation set with `lora` as it is at `step`, saved as PNGs; None if `should_stop()`
        cut it short. Leaves the model ready to train again."""

    def on_samples(self, step: int, samples: list[Sample]) -> None: ...

    def release_memory(self) -> None:
        """The job is over: give back what the host caches (GPU memory)."""


_running: dict[str, "Job"] = {}
_one_at_a_time = threading.Lock()


def request_stop(key: str | None = None) -> int:
    """Ask running jobs (the one of `key`, or all) to stop after their current step; how many."""
    jobs = [j for k, j in list(_running.items()) if key in (None, k)]
    for job in jobs:
        job.request_stop()
    return len(jobs)


def running_runs() -> list[str]:
    return [j.spec.run.path.name for j in list(_running.values())]


class Job:
    def __init__(self, spec: JobSpec, key: str = "job"):
        self.spec, self.key = spec, key
        self._state = JobState.TRAINING
        self._state_lock = threading.Lock()
        self._messages: queue.Queue[StepInfo | None | str] = queue.Queue()  # None, _FINAL: pausing
        self._resume = threading.Event()
        self.finished = False  # the final checkpoint and render are done
        self.trainer: Trainer | None = None
        self.error: BaseException | None = None
        self.loss_before = self.loss_after = float("nan")
        self.samples: list[Sample] = progress.load_samples(spec.run.path)  # a resumed run's earlier ones
        self.latest_images: list[torch.Tensor] = []
        self.saved_step = checkpoints.step_of(spec.resume) if spec.resume else -1
        self.tracker = progress.ProgressTracker(spec.config.steps, spec.backend.device)
        self.notes: list[str] = []
        self._told: set[str] = set()
        self.writes = spec.ranks is None or spec.ranks.primary  # checkpoints, samples, plots
        self.scorer = Scorer(spec.scoring, spec.run.path, self.saved_step if spec.resume else None) \
            if spec.scoring and self.writes and spec.validation else None

    # ----- state, from any thread ----------------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self._state

    def request_stop(self) -> None:
        self._move(JobState.STOPPING)

    def _move(self, state: JobState) -> None:
        with self._state_lock:
            if self._state in (JobState.TRAINING, JobState.STOPPING):
                self._state = state

    def _ending(self) -> bool:
        return self._state in (JobState.STOPPING, JobState.CANCELLING)

    # ----- the worker thread ---------------------------------------------------------------------
    def _work(self) -> None:
        spec = self.spec
        try:
            with torch.inference_mode(False), torch.enable_grad(), ExitStack() as job:  # caller: inference mode
                owned = [e.copied() for e in spec.examples]
                lora = LoraSet(spec.targets, spec.lora_dtype, spec.config.seed).to(spec.backend.device)
                job.enter_context(spec.backend.resident(lora, spec.config.memory))  # swapped blocks stay off
                trainer = Trainer(spec.backend, lora, owned, spec.config, spec.text_encoder, spec.ranks)
                if spec.resume is not None:
                    trainer.load_state(checkpoints.load_state(spec.resume))
                self.trainer = trainer
                probe = probe_examples(owned)
                self.loss_before = self._probe_loss(probe, should_stop=self._ending)
                self._pause()  # samples before training
                while trainer.step < spec.config.steps and not self._ending():
                    if trainer.run(self._next_pause(trainer.step), self._messages.put, self._ending):
                        break
                    if trainer.step < spec.config.steps:
                        self._pause()
                if self._state != JobState.CANCELLING:
                    self.loss_after = self._probe_loss(probe)
                    self._pause(final=True)  # the last checkpoint and samples, the blocks still as they trained
        except BaseException as e:  # raised again on the caller's thread
            self.error = e

    def _probe_loss(self, probe: list[Example], should_stop: Callable[[], bool] = lambda: False) -> float:
        """The fixed-noise loss of the weights to save, captions through the LoRA'd text encoder once it trains."""
        lora = self.trainer.result_lora()
        with self.trainer.text_embeddings(lora) as text:
            return fixed_noise_loss(self.spec.backend, lora, probe, self.spec.config.guidance, should_stop=should_stop,
                                    text=text)

    def _pause(self, final: bool = False) -> None:
        """Hand the caller's thread a quiet moment (samples, checkpoint) and wait for it to finish."""
        self._resume.clear()
        if self._state == JobState.CANCELLING if final else self._ending():  # the caller serves no more
            return
        self._messages.put(_FINAL if final else None)
        self._resume.wait()

    def _next_pause(self, step: int) -> int:
        validation = self.spec.validation
        every = [self.spec.settings.save_every] + ([validation.every] if validation else [])
        return min((step // n + 1) * n for n in every)

    # ----- the caller's thread -------------------------------------------------------------------
    def run(self, host: JobHost) -> Outcome:
        if not _one_at_a_time.acquire(blocking=False):
            raise RuntimeError("Another FLUX DreamBooth training is running in this process: let it finish, or "
                               "Stop it, before starting this one.")
        _running[self.key] = self
        try:
            return self._run(host)
        finally:
            _running.pop(self.key, None)
            _one_at_a_time.release()
            self.trainer = None
            host.release_memory()

    def check(self) -> None:
        """What can fail late, checked before anything is loaded or trained: the settings against
        the dataset, and that the run folder is writable with room for a checkpoint and the LoRA."""
        spec = self.spec
        check_batch_size(spec.config, spec.examples)
        parameters = sum(parameter_count(t) for t in spec.targets)
        spec.run.check_writable(2 * checkpoints.checkpoint_bytes(parameters, spec.config.ema_decay > 0))

    def _run(self, host: JobHost) -> Outcome:
        self.check()
        worker = threading.Thread(target=self._work, name="flux-dreambooth-train", daemon=True)
        device = self.spec.backend.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        host.on_status(JobState.TRAINING, "")
        worker.start()
        try:
            self._serve(worker, host)
            if self.error is not None:
                raise self.error
            if not self.finished:
                self._finish_files(host, render=True)
        except BaseException as e:
            self._abort(worker, host, e)
            raise
        stopped = self._state == JobState.STOPPING
        self._state = JobState.STOPPED if stopped else JobState.DONE
        host.on_status(self._state, "")
        trainer = self.trainer
        lora = trainer.result_lora()
        return Outcome(lora.cpu(), trainer.losses, trainer.step, stopped, self.loss_before, self.loss_after,
                       self.samples, self.latest_images, self.tracker.history, list(self.notes),
                       export.kohya_state_dict(lora), self.scorer.rows if self.scorer else [])

    def _serve(self, worker: threading.Thread, host: JobHost) -> None:
        """Until the loop ends: show its steps, serve its pauses, watch for Cancel."""
        while worker.is_alive() or not self._messages.empty():
            try:
                info = self._messages.get(timeout=0.1)
            except queue.Empty:
                host.check_cancel()
                continue
            if info is None or info is _FINAL:
                try:
                    if info is None:
                        self._at_pause(host)
                    else:
                        self._finish_files(host, render=True)
                        self.finished = True
                finally:
                    self._resume.set()
            else:
                self._show_step(info, host)
            host.check_cancel()

    def _abort(self, worker: threading.Thread, host: JobHost, error: BaseException) -> None:
        """Cancel or a failure: stop the loop, keep what can be kept, say what happened."""
        self._move(JobState.CANCELLING)
        self._resume.set()
        worker.join()
        cancelled = host.is_cancel(error)
        try:  # never hide the error that got us here
            self._finish_files(host, render=False, checkpoint=not isinstance(error, FloatingPointError))
        except Exception:
            log.exception("Could not write the run's files after %s", type(error).__name__)
        step = self.trainer.step if self.trainer else 0
        self._state = JobState.CANCELLED if cancelled else JobState.FAILED
        host.on_status(self._state, f"Cancelled at step {step}." if cancelled else f"{type(error).__name__}: {error}")

    def _show_step(self, info: StepInfo, host: JobHost) -> None:
        shown = self.tracker.update(info.step, info.loss, info.lr, info.preservation_loss)
        host.on_progress(shown, latest=self._messages.empty() or info.step == info.total)
        if info.step % self.spec.settings.plot_every == 0:
            self._write_plots()

    def _tell(self, host: JobHost, note: str) -> None:
        """Something the user should know about the run (shown now, and in the summary)."""
        if note and note not in self._told:
            self._told.add(note)
            self.notes.append(note)
            host.on_status(JobState.TRAINING, note)

    def _at_pause(self, host: JobHost) -> None:
        if not self.writes:
            return
        step, config, trainer = self.trainer.step, self.spec.config, self.trainer
        self._tell(host, trainer.dataset_change)
        self._tell(host, trainer.text_note)
        if not self.tracker.history and trainer.losses:  # a resumed run: plot from its first step
            self.tracker.replay(trainer.losses, [config.learning_rate * config.lr_factor(i)
                                                 for i in range(len(trainer.losses))])
        if step > 0 and step % self.spec.settings.save_every == 0:
            self._save_checkpoint(host)
        validation = self.spec.validation
        if validation and ((step == 0 and validation.before_training) or (step > 0 and step % validation.every == 0)):
            self._render(host)
        self.tracker.restart_clock()

    def _save_checkpoint(self, host: JobHost) -> None:
        trainer, spec = self.trainer, self.spec
        if trainer is None or trainer.step in (0, self.saved_step):
            return
        header = spec.metadata.header(trainer.step)
        state = {**trainer.state(), **checkpoints.describe(spec.metadata.spec, spec.backend.dims, trainer.lora)}
        path = spec.run.save(trainer.step, export.kohya_state_dict(trainer.result_lora()), header, state,
                             keep=spec.settings.keep_last)
        self.saved_step = trainer.step
        log.info("Checkpoint %s", path)
        host.on_checkpoint(trainer.step, path)

    def _render(self, host: JobHost, final: bool = False) -> None:
        """The evaluation set at this step. Stop cuts a render short, except the final one (at the
        step it stopped), which only Cancel does."""
        trainer, spec = self.trainer, self.spec
        if trainer is None or any(s.step == trainer.step for s in self.samples):  # done (before a resume)
            return
        host.on_rendering(trainer.step, spec.validation.count)
        should_stop = (lambda: self._state == JobState.CANCELLING) if final else self._ending
        lora = trainer.result_lora()
        rendered = host.render(lora, trainer.step, should_stop)
        if rendered is None:  # Stop pressed mid-render: the final render, at the stop step, follows
            return
        samples, images = rendered
        self.samples += samples
        self.latest_images = [images]
        progress.save_samples(spec.run.path, self.samples)
        host.on_samples(trainer.step, samples)
        if self.scorer is not None:
            self.scorer.score(host, lora, trainer.step, images, should_stop)

    def _finish_files(self, host: JobHost, render: bool, checkpoint: bool = True) -> None:
        """At the end, however it came: the last checkpoint, last samples, grid, strip, plots."""
        if self.trainer is None or not self.writes:
            return
        if checkpoint:
            self._save_checkpoint(host)
        if render and self.spec.validation:
            self._render(host, final=True)
        if render and self.scorer is not None:
            chosen = self.scorer.finish([checkpoints.step_of(c) for c in self.spec.run.checkpoints()])
            self._tell(host, chosen.line() if chosen else "")
        folder = self.spec.run.path
        if self.samples:
            progress.write_sample_grid(folder / "grid.png", self.samples)
            progress.progress_strip(self.samples, folder / "progress.gif")
        self._write_plots()

    def _write_plots(self) -> None:
        if self.tracker.history and self.writes:
            progress.write_history(self.spec.run.path, self.tracker.history)
            progress.write_loss_plot(self.spec.run.path / "loss.png", self.tracker.history,
                                     self.scorer.rows if self.scorer else ())
