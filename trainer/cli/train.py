"""`python -m trainer train`: a recipe trained as a job (../loop/job.py), the same machinery as the
Train node: checkpoints, resume, validation renders, loss history. Only the host differs: here
the console shows progress, Ctrl-C is Cancel, and samples render with the library's sampler."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .. import files
from ..data import controls
from ..data.captions import TRIGGER_PLACEHOLDER
from ..data.encode import EncodeCache, encode_dataset
from ..families.conditioning import Conditioning
from ..families.flux1 import tiny
from ..log import logger
from ..loop import distributed, quantize, scoring
from ..loop.job import Job, JobSpec, JobState, ValidationSchedule
from ..loop.text_phase import text_targets
from ..lora import text_encoder
from ..lora.weights import LoraSet
from ..outputs import checkpoints, export, scores
from ..outputs.checkpoints import RunFolder
from ..outputs.progress import Progress, Sample
from ..outputs.sample import sample
from ..recipe import build, formats, from_run, importing, text
from ..recipe.fields import RecipeError
from ..recipe.schema import Recipe
from . import console, embedder, models

log = logger(__name__)

DEFAULT_OUTPUT = Path("flux_dreambooth_output")
MIN_FREE_BYTES = 64 << 20


class Interrupted(Exception):
    """Ctrl-C: the job ends within a step and keeps a checkpoint."""


def add_arguments(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (our config format) on a model",
                       description="Train the recipe of a config file: checkpoints, samples and loss history in "
                                   "a run folder, the LoRA beside it.")
    p.add_argument("--config", type=Path, required=True, help="the recipe (our YAML or JSON format)")
    p.add_argument("--model", required=True, metavar="tiny|FILE|FOLDER",
                   help="the model to train on: 'tiny' (the embedded tiny FLUX, random weights; --family flux2 for "
                        "the tiny FLUX.2), a FLUX.1 or FLUX.2 transformer file (bf16 or fp8; a path, or a name in "
                        "--models-dir), or a diffusers FLUX.1 folder")
    models.add_arguments(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting of the recipe: dotted keys (train.steps=10) or short ones (steps, "
                        "learning_rate, batch_size, seed, rank, alpha, resolution, save_every, keep_last, "
                        "ema_decay, optimizer, lr_schedule); `python -m trainer keys` lists them all")
    p.add_argument("--resume", default="", metavar="latest|PATH",
                   help="continue the newest checkpoint of this run name ('latest'), or a run or checkpoint folder")
    p.add_argument("--out", type=Path, help="output folder (default: the recipe's save.output, else "
                                            f"./{DEFAULT_OUTPUT})")
    p.add_argument("--log-every", type=int, default=10, metavar="N", help="a progress line every N steps")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="progress lines as text, or as one JSON object per line (step, total, loss, loss_smooth, "
                        "lr, seconds_per_step, eta_seconds, peak_memory_gib) for scripts")
    console.add_arguments(p)
    p.set_defaults(run=run)


@functools.cache
def tiny_model():
    """The embedded tiny FLUX, built once per process (training leaves its weights as they are)."""
    return tiny.build(0)


@functools.cache
def tiny_flux2_model():
    """The embedded tiny FLUX.2 [klein] (`--model tiny --family flux2`), built once per process."""
    from ..families.flux2 import tiny as tiny2

    return tiny2.build(0)


def load_model(plan: models.Plan):
    if plan.loader != models.TINY:
        return models.load(plan)
    return tiny_flux2_model() if plan.family == "flux2" else tiny_model()


def output_root(out: Path | None, recipe: Recipe, base: Path) -> Path:
    """Where run folders go, checked writable with room to spare before anything is written."""
    root = out.expanduser() if out else importing.resolve(recipe.save.output, base) if recipe.save.output \
        else DEFAULT_OUTPUT
    where = "--out" if out else "save.output" if recipe.save.output else "the default output folder"
    if root.exists() and not root.is_dir():
        raise RecipeError(f"{where} {root} is a file; give a folder.")
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"{where} {root}: {existing} is not a writable folder; choose another output folder.")
    if shutil.disk_usage(existing).free < MIN_FREE_BYTES:
        raise RecipeError(f"{where} {root}: the disk is full ({existing}); free some space or choose another folder.")
    return root


def run_and_checkpoint(recipe: Recipe, root: Path, resume: str) -> tuple[RunFolder, Path | None]:
    settings = build.run_settings(recipe)
    if not resume:
        return checkpoints.next_run_folder(root, settings.name), None
    given = Path(resume).expanduser()
    if resume != checkpoints.LATEST and given.exists():
        found = RunFolder(given).latest() if (given / "checkpoints").is_dir() else given
        if found is None or not (found / checkpoints.STATE_FILE).is_file():
            raise RecipeError(f"--resume {resume}: no checkpoint there; give a run folder or "
                              ".../checkpoints/step_000250, or 'latest'.")
        return RunFolder(found.parent.parent), found
    return build.run_settings(recipe, resume).folder_and_checkpoint(root)


class ConsoleHost:
    """A job's JobHost on the command line: progress lines, Ctrl-C as Cancel, samples rendered by
    the library's Euler sampler with the LoRA as it is at that step."""

    def __init__(self, model, recipe: Recipe, folder: Path, log_every: int, log_json: bool = False,
                 shown: console.Console | None = None):
        self.model, self.recipe, self.folder, self.log_every = model, recipe, folder, max(1, log_every)
        self.log_json = log_json
        self.console = shown or console.Console(folder, bar=False, tensorboard=False)
        v, trigger = recipe.validation, recipe.dataset.trigger.strip()
        self.size = (v.size or recipe.dataset.resolution[0]) // model.backend().family.downscale
        self.prompts = [p.replace(TRIGGER_PLACEHOLDER, trigger) for p in v.prompts]
        self.encoded = [model.encode_text(p) for p in self.prompts]
        self.interrupted = False
        self.first_step: int | None = None
        self.references: tuple[torch.Tensor, ...] = ()  # an edit LoRA's samples edit the first control image

    def on_interrupt(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        log.warning("Ctrl-C: stopping within a step and writing a checkpoint (Ctrl-C again to quit at once).")

    def check_cancel(self) -> None:
        if self.interrupted:
            raise Interrupted("Stopped by Ctrl-C.")

    def is_cancel(self, error: BaseException) -> bool:
        return isinstance(error, (Interrupted, KeyboardInterrupt))

    def on_status(self, state: JobState, message: str) -> None:
        if message and state is not JobState.FAILED:  # a failure is told once, by main(), with its exit code
            log.info("%s: %s", state.value, message)

    def on_progress(self, progress: Progress, latest: bool) -> None:
        first = self.first_step is None  # the first step of this run (after a checkpoint when resuming)
        self.first_step = progress.step if first else self.first_step
        self.console.on_progress(progress)
        lines = self.log_json or self.console.bar is None  # the bar shows what a text line would
        if lines and (first or progress.step % self.log_every == 0 or progress.step == progress.total):
            log.info("%s", json.dumps(vars(progress)) if self.log_json else progress.line())

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass  # the job logs it

    def on_rendering(self, step: int, count: int) -> None:
        log.info("Rendering %d validation sample(s) at step %d.", count, step)

    def render(self, lora: LoraSet, step: int, should_stop: Callable[[], bool]
               ) -> tuple[list[Sample], torch.Tensor] | None:
        v = self.recipe.validation
        samples, images = [], []
        encoded = self.encoded
        if text_encoder.has_delta(lora):  # the text encoder trains: the prompts through it, as the LoRA has it
            trainable = self.model.trainable_text()
            with torch.no_grad(), text_encoder.applied(trainable, lora):
                encoded = [trainable.encode(p) for p in self.prompts]
        for i, (prompt, embedded) in enumerate(zip(self.prompts, encoded)):
            if should_stop():
                return None
            pixels = self._sample(lora, embedded)
            image = Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            path = files.write_image(self.folder / "samples" / f"step_{step:06d}_{i:02d}.png", image)
            samples.append(Sample(step, i, f"{prompt} · seed {v.seed} · g {v.guidance:g}", path))
            images.append(pixels)
        return samples, torch.cat(images)

    def _sample(self, lora: LoraSet | None, embedded) -> torch.Tensor:
        """One prompt's image (1, 3, H, W) with `lora` (None: the base model) at the validation seed."""
        v, backend = self.recipe.validation, self.model.backend()
        with backend.lora_applied(lora) if lora is not None else contextlib.nullcontext():
            latents = sample(backend, Conditioning.of([embedded], v.guidance, self.references), self.size, self.size,
                             v.steps, v.seed)
        return self.model.decode(latents.cpu()).cpu()

    def render_prompts(self, lora: LoraSet | None, prompts: list[str], should_stop: Callable[[], bool]
                       ) -> torch.Tensor | None:
        """For the scores (loop/scoring.py): each prompt at the validation seed, (N, H, W, 3)."""
        images = []
        for prompt in prompts:
            if should_stop():
                return None
            if lora is not None and text_encoder.has_delta(lora):
                trainable = self.model.trainable_text()
                with torch.no_grad(), text_encoder.applied(trainable, lora):
                    embedded = trainable.encode(prompt)
            else:
                embedded = self.model.encode_text(prompt)
            images.append(self._sample(lora, embedded))
        return torch.cat(images).permute(0, 2, 3, 1)

    def on_scores(self, score, rows) -> None:
        self.console.on_scores(score)

    def on_samples(self, step: int, samples: list[Sample]) -> None:
        log.info("Samples of step %d in %s", step, self.folder / "samples")
        self.console.on_samples(step, samples)

    def release_memory(self) -> None:
        pass


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def note_changes(previous: Path, recipe: Recipe) -> None:
    """Say which settings differ from the run's recipe when it is resumed (more steps, a lower rate…)."""
    try:
        before = _flat(text.loads(previous.read_text(encoding="utf-8")).to_dict())
    except (OSError, ValueError):
        return
    after = _flat(recipe.to_dict())
    changed = [f"{k} {before[k]!r} -> {after[k]!r}" for k in after if k in before and before[k] != after[k]]
    if changed:
        log.info("Resuming with changed settings: %s.", "; ".join(changed))


def scored_validation(recipe: Recipe, base: Path):
    """The validation section as the run's recipe holds it: a scores model folder made absolute."""
    folder = embedder.check(recipe.validation.scores, base) if recipe.validation.scores else None
    return dataclasses.replace(recipe.validation, scores=str(folder.absolute())) if folder else recipe.validation


def run(args) -> int:
    started = time.perf_counter()
    imported = formats.load(args.config)
    if imported.unsupported and imported.format == "ours":  # in our own format, a typo: stop
        raise RecipeError(f"{args.config} has settings that can't be used (`python -m trainer config` shows all):\n  "
                          + "\n  ".join(f"{u.key}: {u.why}" for u in imported.unsupported))
    for u in imported.unsupported:  # another tool's file: train what it sets that we have, and say what not
        log.warning("%s: %s is not used: %s", args.config, u.key, u.why)
    recipe = imported.recipe.with_settings(args.set)
    base = Path(args.config).expanduser().absolute().parent
    # everything that can be checked before anything is loaded or written
    build.check_paths(recipe, base, imported.origins)
    model_plan = models.plan(args)
    if recipe.validation.scores and recipe.validation.prompts:
        embedder.check(recipe.validation.scores, base)
        try:
            scoring.check(recipe.validation.prompts, recipe.validation.max_drift)
        except ValueError as e:
            raise RecipeError(f"validation.scores: {e}") from None
    console.check(args)
    try:
        export.check_format(recipe.save.format, {recipe.layers.variant})
    except ValueError as e:
        raise RecipeError(f"save.format and layers.variant: {e}") from None
    root = output_root(args.out, recipe, base)
    ranks = distributed.from_env()  # under torchrun: this process's rank (None on its own)
    writes = ranks is None or ranks.primary
    folder, resume = run_and_checkpoint(recipe, root, args.resume.strip()) if writes else (None, None)
    if ranks is not None:  # rank 0's choice of run folder, before it writes into it
        folder, resume = ranks.from_primary((folder, resume))
    model = load_model(model_plan)
    backend = model.backend()
    spec = build.layer_spec(recipe, backend.dims)
    dataset = build.dataset(recipe, base)
    cache = EncodeCache(root / "cache", memory=False) if ranks else None  # rank 0 encodes, the others read
    examples, skipped = distributed.primary_first(ranks, lambda: encode_dataset(
        dataset, model, cache, recipe.train.seed, dop_class=recipe.train.preservation_class()))
    if cache is not None and not writes and cache.misses:
        log.warning("Rank %d encoded %d item(s) rank 0 did not leave in %s: is that folder on a disk all "
                    "processes share?", ranks.rank, cache.misses, cache.folder)
    for problem in skipped:
        log.warning("Left out: %s", problem)
    trainable = model.trainable_text() if recipe.train.text_encoder_lr > 0 else None
    text_part = text_targets(recipe.train, trainable, spec)
    targets = spec.targets(backend.dims) + text_part
    resolution = ",".join(map(str, recipe.dataset.resolution))
    metadata = export.LoraMetadata(spec, dataset.trigger_word, model.name, {
        "resolution": resolution, "learning_rate": recipe.train.learning_rate, "seed": recipe.train.seed,
        "run": folder.path.name, "recipe": text.to_json(recipe)},
        family=backend.family.name, variant=controls.variant(backend.variant, dataset),
        text_encoders=tuple(dict.fromkeys(t.component for t in text_part)))
    v = recipe.validation
    schedule = ValidationSchedule(v.every, v.before_training, len(v.prompts)) if v.prompts else None
    log_json = args.log_format == "json"
    # the bar and TensorBoard are rank 0's, as every file is
    shown = console.Console(folder.path, writes and console.wants_bar(args.progress, log_json),
                            writes and args.report_to == "tensorboard")
    host = ConsoleHost(model, recipe, folder.path, args.log_every, log_json, shown)
    scored = None
    if schedule and recipe.validation.scores and writes:
        scored = scoring.plan(embedder.load(v.scores, base, backend.device), dataset, v.prompts, v.max_drift,
                              f"seed {v.seed}, {v.steps} steps, guidance {v.guidance:g}, {host.size * 8} px")
    elif v.scores and not v.prompts:
        log.warning("validation.scores is set but validation.prompts is empty: no renders, so no scores.")
    if examples[0].control is not None:  # Kontext pairs: samples edit the first control image, as the nodes do
        host.references = (examples[0].control[None],)
    log.info("Training %d LoRA layers on %d images at %s for %d steps into %s%s.", len(targets), len(examples),
             resolution, recipe.train.steps, folder.path, f", resuming {resume.name}" if resume else "")
    # the run's recipe as it trains (folders resolved, the layers fitted to the model): recipe.yaml, and
    # recipe_ai_toolkit.yaml; rank 0's to write
    ran = from_run.recipe_of_run(recipe.train, spec, backend.dims, dataset, build.run_settings(recipe),
                                 (scored_validation(recipe, base), []),
                                 dataclasses.replace(recipe.save, output=str(root.absolute())),
                                 notes=[f"model: --model {args.model} on the command line (not a key of the file)."])
    if resume is not None and writes:
        note_changes(folder.path / from_run.RECIPE_FILE, ran.recipe)
    if writes:
        from_run.write_run_recipe(folder.path, ran)
    job = Job(JobSpec(backend, examples, recipe.train, targets, folder, build.run_settings(recipe), metadata,
                      resume=resume, validation=schedule, text_encoder=trainable, ranks=ranks, scoring=scored),
              key="cli")
    main_thread = threading.current_thread() is threading.main_thread()
    # Ctrl-C is rank 0's to act on: the other ranks wait for it in the next step, then torchrun ends them
    previous = signal.signal(signal.SIGINT, host.on_interrupt if writes else signal.SIG_IGN) if main_thread else None
    try:
        with shown.logging_beside_the_bar(), quantize.quantized_base(backend, recipe.train.memory.base_quantization):
            outcome = job.run(host)
        shown.on_done(outcome.steps_done, outcome.loss_before, outcome.loss_after)
    except Interrupted:
        latest = RunFolder(folder.path).latest()
        raise Interrupted(f"Stopped by Ctrl-C; the newest checkpoint is {latest}. Continue it with the same command "
                          "and --resume latest.") from None
    finally:
        shown.close()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if not writes:
        ranks.finish()  # rank 0 writes the LoRA and the summary
        return 0
    fmt = recipe.save.format
    lora_path = files.write_safetensors(
        root / f"{folder.path.name}.safetensors",
        export.TrainedLora(outcome.lora, {"dreambooth.family": backend.family.name}, outcome.kohya).to_file_dict(
            fmt, export.SAVE_DTYPES[recipe.save.dtype]),
        metadata.header(outcome.steps_done, fmt))
    seconds = time.perf_counter() - started
    summary = {"steps": outcome.steps_done, "fixed_noise_loss_before": outcome.loss_before,
               "fixed_noise_loss_after": outcome.loss_after, "seconds": seconds, "lora": str(lora_path),
               "run": str(folder.path), "resumed_from": str(resume) if resume else None, "losses": outcome.losses,
               "best_checkpoint": scores.best_step(folder.path)}
    files.write_json(folder.path / "summary.json", summary, indent=1)
    log.info("Done: %d steps in %.1f s; fixed-noise loss %.4f -> %.4f. LoRA %s; run folder %s.",
             outcome.steps_done, seconds, outcome.loss_before, outcome.loss_after, lora_path, folder.path)
    if ranks is not None:
        ranks.finish()
    return 0
