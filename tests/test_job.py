"""The training job on its own (no ComfyUI): the worker thread, the pause handshake for checkpoints
and validation renders, Stop, Cancel, an exception on the worker, a NaN loss."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import files
from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.families.conditioning import Conditioning
from trainer.loop import job as jobs
from trainer.loop import trainer as loop
from trainer.loop.job import Job, JobSpec, JobState, ValidationSchedule
from trainer.lora.targets import LayerSpec
from trainer.outputs import checkpoints, export
from trainer.outputs.checkpoints import RunFolder, RunSettings
from trainer.outputs.progress import Sample
from trainer.outputs.sample import sample

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


class Cancelled(Exception):
    pass


class RecordingHost:
    """A JobHost that renders with the library's sampler and writes down everything it is told.
    `cancel_at` / `stop_at`: press Cancel / Stop once that step has been shown."""

    def __init__(self, job: Job, model, cancel_at: int | None = None, stop_at: int | None = None):
        self.job, self.model = job, model
        self.cancel_at, self.stop_at = cancel_at, stop_at
        self.log: list[tuple] = []
        self.threads: set[str] = set()
        self.cancel = False

    def _note(self, *entry):
        self.threads.add(threading.current_thread().name)
        self.log.append(entry)

    def check_cancel(self):
        if self.cancel:
            raise Cancelled("cancel pressed")

    def is_cancel(self, error):
        return isinstance(error, Cancelled)

    def on_status(self, state, message):
        self._note("status", state, message)

    def on_progress(self, progress, latest):
        self._note("step", progress.step)
        if progress.step == self.cancel_at:
            self.cancel = True
        if progress.step == self.stop_at:
            threading.Thread(target=self.job.request_stop).start()  # as the panel's route would
            time.sleep(0.3)

    def on_checkpoint(self, step, path):
        self._note("checkpoint", step, self.job.trainer.step)

    def on_rendering(self, step, count):
        self._note("rendering", step, count)

    def render(self, lora, step, should_stop):
        job, backend = self.job, self.job.spec.backend
        context, pooled = self.model.encode_text("a photo of sks toy")
        samples, images = [], []
        for i in range(job.spec.validation.count):
            if should_stop():
                return None
            with backend.lora_applied(lora):
                latents = sample(backend, Conditioning(context[None], pooled[None], 3.5), 8, 8, steps=3, seed=i)
            pixels = self.model.decode(latents)
            image = Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            path = files.write_image(job.spec.run.path / "samples" / f"step_{step:06d}_{i:02d}.png", image)
            samples.append(Sample(step, i, f"sample {i}", path))
            images.append(pixels)
            time.sleep(0.05)
        self._note("render", step, job.trainer.step)  # the trainer did not move while we rendered
        return samples, torch.cat(images)

    def on_samples(self, step, samples):
        self._note("samples", step, len(samples))

    def release_memory(self):
        self._note("released")

    def entries(self, kind):
        return [e[1:] for e in self.log if e[0] == kind]


@pytest.fixture(scope="module")
def examples(tiny_flux):
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0]


def make_job(tiny_flux, examples, tmp_path, steps=6, save_every=2, validation=None, resume=None):
    backend = tiny_flux.backend()
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    config = loop.TrainConfig(steps=steps, learning_rate=1e-3, seed=0)
    run = RunFolder(tmp_path / "run_001")
    return Job(JobSpec(backend, examples, config, spec.targets(backend.dims), run, RunSettings(save_every=save_every),
                       export.LoraMetadata(spec, "sks", "tiny"), resume=resume, validation=validation))


def test_a_whole_run_pauses_for_checkpoints_and_renders(tiny_flux, examples, tmp_path):
    job = make_job(tiny_flux, examples, tmp_path, validation=ValidationSchedule(3, True, 2))
    host = RecordingHost(job, tiny_flux)
    outcome = job.run(host)

    assert outcome.steps_done == 6 and not outcome.stopped and len(outcome.losses) == 6
    assert outcome.loss_after < outcome.loss_before
    assert host.entries("step") == [(s,) for s in range(1, 7)]
    # each pause happened with the worker waiting: the trainer's step is the pause's step
    assert host.entries("checkpoint") == [(2, 2), (4, 4), (6, 6)]
    assert host.entries("render") == [(0, 0), (3, 3), (6, 6)]
    order = [e[0] + str(e[1]) for e in host.log if e[0] in ("step", "checkpoint", "render")]
    assert order.index("render3") == order.index("step3") + 1 and order.index("checkpoint4") == order.index("step4") + 1
    assert host.threads == {threading.current_thread().name}  # the host is only ever called on our thread
    assert [e[0] for e in host.entries("status")] == [JobState.TRAINING, JobState.DONE]
    assert host.log[-1] == ("released",)
    folder = job.spec.run.path
    assert [p.name for p in RunFolder(folder).checkpoints()] == ["step_000002", "step_000004", "step_000006"]
    for name in ("grid.png", "progress.gif", "loss.png", "loss_history.csv", "samples.json"):
        assert (folder / name).is_file(), name
    assert len(list((folder / "samples").glob("*.png"))) == 6
    assert jobs.running_runs() == []


def test_stop_ends_after_the_step_with_a_checkpoint_and_a_final_render(tiny_flux, examples, tmp_path):
    job = make_job(tiny_flux, examples, tmp_path, steps=40, save_every=100,
                   validation=ValidationSchedule(100, False, 2))
    host = RecordingHost(job, tiny_flux, stop_at=2)
    outcome = job.run(host)

    assert outcome.stopped and 2 <= outcome.steps_done <= 4
    assert np.isfinite(outcome.loss_after)
    step = outcome.steps_done
    assert host.entries("checkpoint") == [(step, step)]
    assert host.entries("render") == [(step, step)]  # Stop does not cut the final render short
    assert host.entries("status")[-1][0] == JobState.STOPPED


def test_cancel_ends_within_a_step_keeps_a_checkpoint_and_raises(tiny_flux, examples, tmp_path):
    job = make_job(tiny_flux, examples, tmp_path, steps=40, save_every=100,
                   validation=ValidationSchedule(100, False, 2))
    host = RecordingHost(job, tiny_flux, cancel_at=3)
    with pytest.raises(Cancelled):
        job.run(host)
    state, message = host.entries("status")[-1]
    assert state == JobState.CANCELLED and "Cancelled at step" in message
    ((step, _),) = host.entries("checkpoint")
    assert 3 <= step <= 4  # the step in flight when Cancel came, at most
    assert host.entries("render") == []  # Cancel renders nothing more
    saved = checkpoints.load_state(RunFolder(job.spec.run.path).latest())
    assert saved["step"] == step
    assert jobs.running_runs() == [] and host.log[-1] == ("released",)

    # the cancelled run resumes from its checkpoint to the uninterrupted run's LoRA
    straight_job = make_job(tiny_flux, examples, tmp_path / "straight", steps=6, save_every=100)
    straight = straight_job.run(RecordingHost(straight_job, tiny_flux))
    resumed_job = make_job(tiny_flux, examples, tmp_path, steps=6, save_every=100,
                           resume=RunFolder(job.spec.run.path).latest())
    resumed = resumed_job.run(RecordingHost(resumed_job, tiny_flux))
    assert resumed.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(resumed.lora.parameters(), straight.lora.parameters()))


def test_cancel_before_the_first_step_does_not_hang(tiny_flux, examples, tmp_path, monkeypatch):
    measure = jobs.fixed_noise_loss

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return measure(*args, **kwargs)

    monkeypatch.setattr(jobs, "fixed_noise_loss", slow)
    job = make_job(tiny_flux, examples, tmp_path)
    host = RecordingHost(job, tiny_flux)
    host.cancel = True
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        job.run(host)
    assert time.perf_counter() - started < 20
    assert [e[0] for e in host.entries("status")] == [JobState.TRAINING, JobState.CANCELLED]
    assert host.entries("step") == []


def test_an_exception_on_the_worker_reaches_the_caller_with_the_last_whole_step_saved(tiny_flux, examples, tmp_path,
                                                                                     monkeypatch):
    real, calls = loop.step_loss, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (pretend)")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "step_loss", broken)
    job = make_job(tiny_flux, examples, tmp_path, save_every=100)
    host = RecordingHost(job, tiny_flux)
    with pytest.raises(RuntimeError, match="out of memory"):
        job.run(host)
    state, message = host.entries("status")[-1]
    assert state == JobState.FAILED and "RuntimeError: CUDA out of memory" in message
    assert host.entries("checkpoint") == [(2, 2)]  # the state as after the last whole step
    assert checkpoints.load_state(RunFolder(job.spec.run.path).latest())["step"] == 2


def test_a_nan_loss_fails_the_run_and_keeps_only_finite_checkpoints(tiny_flux, examples, tmp_path, monkeypatch):
    real, calls = loop.step_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(loop, "step_loss", poisoned)
    job = make_job(tiny_flux, examples, tmp_path, save_every=1)
    host = RecordingHost(job, tiny_flux)
    with pytest.raises(FloatingPointError, match="The loss became nan at step 3"):
        job.run(host)
    assert host.entries("status")[-1][0] == JobState.FAILED
    assert [p.name for p in RunFolder(job.spec.run.path).checkpoints()] == ["step_000001", "step_000002"]


def test_one_job_at_a_time_and_stop_by_key(tiny_flux, examples, tmp_path):
    first = make_job(tiny_flux, examples, tmp_path / "a", steps=200, save_every=1000)
    blocked = {}

    class Host(RecordingHost):
        def on_progress(self, progress, latest):
            super().on_progress(progress, latest)
            if progress.step == 2 and not blocked:
                second = make_job(tiny_flux, examples, tmp_path / "b")
                with pytest.raises(RuntimeError, match="Another FLUX DreamBooth training is running") as e:
                    second.run(RecordingHost(second, tiny_flux))
                blocked["message"] = str(e.value)
                assert jobs.running_runs() == ["run_001"]
                assert jobs.request_stop("someone else") == 0
                assert jobs.request_stop("job") == 1

    outcome = first.run(Host(first, tiny_flux))
    assert blocked and outcome.stopped and outcome.steps_done < 200
