"""The ComfyUI side of a training job (the job itself is ../trainer/loop/job.py): ComfyUI's
progress bar and console line, the websocket events the panel draws, validation renders through
ComfyUI's sampler, Cancel, and ComfyUI's model memory. Everything here runs on the node's thread."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..trainer.families.backend import FluxBackend
from ..trainer.log import logger
from ..trainer.loop.job import Job, JobSpec, JobState, Outcome
from ..trainer.lora import text_encoder
from ..trainer.lora.weights import LoraSet
from ..trainer.outputs import export
from ..trainer.outputs.progress import Progress, Sample
from . import ids
from .host import events, loras, models, paths
from .host.sampling import Renderer, RenderStopped

log = logger(__name__)


class ComfyJobHost:
    """A job's JobHost inside the Train node: `node_id` routes the events to its panel."""

    def __init__(self, node_id: str, run_name: str, total: int, patcher, renderer: Renderer | None,
                 backend: FluxBackend | None = None, keep_off: Sequence[str] = (), quantized: bool = False):
        """`keep_off`: the blocks a block-swap run keeps off the device (`backend` renders with them).
        `quantized`: the base is held in int8 for the run, which ComfyUI can't merge a LoRA into."""
        self.node_id, self.run_name, self.patcher, self.renderer = node_id, run_name, patcher, renderer
        self.total, self.bar, self.console = total, None, None
        self.backend, self.keep_off, self.quantized = backend, list(keep_off), quantized

    def _send(self, event: str, **data) -> None:
        events.send_event(event, {"node": self.node_id, **data})

    def check_cancel(self) -> None:
        models.check_cancel()

    def is_cancel(self, error: BaseException) -> bool:
        return models.is_cancel(error)

    def on_status(self, state: JobState, message: str) -> None:
        if state == JobState.TRAINING:
            if not message:  # the start; a message while training is a note (the dataset changed on resume)
                self.bar = events.progress_bar(self.total)
                self.console = tqdm(total=self.total, desc="FLUX LoRA", disable=not events.console_progress_enabled())
        elif self.console is not None:
            self.console.close()
        self._send(ids.EVENT_STATUS, state=state.value, message=message, run=self.run_name)

    def on_progress(self, progress: Progress, latest: bool) -> None:
        self.bar.update_absolute(progress.step, progress.total)  # also raises if Cancel was pressed
        self.console.n = progress.step
        self.console.set_postfix_str(f"loss {progress.loss:.4f} (avg {progress.loss_smooth:.4f}) lr {progress.lr:.1e} "
                                     f"peak {progress.peak_memory_gib:.1f} GiB {progress.memory_device}",
                                     refresh=False)
        self.console.refresh()
        if latest:  # behind? skip to the newest
            self._send(ids.EVENT_PROGRESS, **vars(progress))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._send(ids.EVENT_CHECKPOINT, step=step, path=str(path.relative_to(paths.runs_root())))

    def on_rendering(self, step: int, count: int) -> None:
        self._send(ids.EVENT_RENDERING, step=step, count=count)

    def render(self, lora: LoraSet, step: int, should_stop: Callable[[], bool]
               ) -> tuple[list[Sample], torch.Tensor] | None:
        return self._rendering(lora, lambda model, clip: self.renderer.render(model, step, should_stop, clip))

    def render_prompts(self, lora: LoraSet | None, prompts: list[str], should_stop: Callable[[], bool]
                       ) -> torch.Tensor | None:
        """The scores' renders (../trainer/loop/scoring.py); `lora` None: the model as loaded."""
        return self._rendering(lora, lambda model, clip: self.renderer.render_prompts(model, prompts, should_stop,
                                                                                      clip))

    def _rendering(self, lora: LoraSet | None, draw: Callable):
        sd = export.kohya_state_dict(lora) if lora is not None else None
        if self.keep_off or self.quantized:  # as it trains (swapped blocks streamed in), LoRA on activations
            model = models.sampling_as_loaded(self.patcher)
            lora_on = self.backend.lora_applied(lora) if lora is not None else nullcontext()
        else:  # as a workflow renders it: the LoRA merged into the weights by ComfyUI's loader
            model, lora_on = (loras.apply_lora(self.patcher, sd, 1.0) if sd else self.patcher), nullcontext()
        # once the text encoder trains, the prompts go through the CLIP with its LoRA, as Load LoRA gives it
        teaches_text = lora is not None and text_encoder.has_delta(lora)
        clip = loras.apply_lora_to_clip(self.renderer.clip, sd, 1.0) if teaches_text else None
        try:
            with lora_on:
                return draw(model, clip)
        except RenderStopped:
            return None
        finally:  # the LoRA's patches come off, and what ComfyUI moved off to render goes back on
            models.load_for_training(self.patcher, self.keep_off, again=True)

    def after_embedding(self) -> None:
        models.load_for_training(self.patcher, self.keep_off, again=True)  # the CLIP_VISION may have moved it off

    def on_scores(self, score, rows) -> None:
        self._send(ids.EVENT_SCORES, step=score.step, likeness=score.likeness, drift=score.drift)

    def on_samples(self, step: int, samples: list[Sample]) -> None:
        self._send(ids.EVENT_SAMPLES, step=step, labels=[s.label for s in samples],
                   images=[paths.output_reference(s.path) for s in samples])

    def release_memory(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.keep_off:  # ComfyUI loads it whole when next needed
            models.unload(self.patcher)
        models.release_memory()


def train(spec: JobSpec, node_id: str, patcher, renderer: Renderer | None) -> Outcome:
    """Run `spec` as the Train node's job: one at a time in this ComfyUI, Stop through the panel."""
    memory = spec.config.memory
    host = ComfyJobHost(node_id, spec.run.path.name, spec.config.steps, patcher, renderer, spec.backend,
                        spec.backend.swapped_blocks(memory), memory.base_quantization != "none")
    return Job(spec, key=node_id).run(host)
