"""The training loop: read in one sitting.

Examples arrive already encoded (latents and text embeddings), so a step is only the transformer:
draw σ and ε, noise the latents, predict the velocity, step AdamW on the LoRA.
"""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.encode import Example
from ..families.backend import FluxBackend
from ..families.conditioning import Conditioning
from ..log import logger
from ..lora.text_encoder import TrainableText
from ..lora.weights import LoraSet
from ..outputs.checkpoints import check_family
from . import flow, optimizers, schedules
from .batches import EpochSampler
from .config import LR_SCHEDULES, TrainConfig, check_batch_size  # noqa: F401 (the loop's public names)
from .distributed import Ranks, check_batch, rebatched
from .preservation import Preservation, check_examples
from .resume import dataset_change, example_key
from .step import step_loss  # noqa: F401 (the loop's public name; tests patch it here)
from .text_phase import Embed, TextPhase, check_resume

log = logger(__name__)

FINITE_CHECK_EVERY = 4  # steps between reads of the loss and gradient norm (a device sync): a NaN stops the run
# within this many steps, and always before a segment ends (before any checkpoint is written)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA's decay at (0-based) optimizer step `step`, warmed up as diffusers' EMAModel and
    ai-toolkit do: min(decay, (1 + step) / (10 + step)), and 0 at the first step, so the average
    starts at the first trained weights, never at the initial LoRA (whose up matrices are zero).
    A fixed 0.999 would leave 0.999^750 ≈ 47 % of that zero start in the LoRA after 750 steps."""
    return 0.0 if step <= 0 else min(decay, (1 + step) / (10 + step))


@dataclass
class StepInfo:
    step: int
    total: int
    lr: float
    loss_tensor: torch.Tensor = field(repr=False)
    preservation_tensor: torch.Tensor | None = field(default=None, repr=False)  # with DOP on

    @property
    def loss(self) -> float:
        """This step's loss. Reading it waits for the device (do it on another thread, as the
        node does, or not every step); unread, steps queue up on the device without a sync."""
        return self.loss_tensor.item()

    @property
    def preservation_loss(self) -> float | None:
        """This step's differential output preservation loss (not part of `loss`); None when off."""
        return None if self.preservation_tensor is None else self.preservation_tensor.item()


@dataclass
class TrainResult:
    losses: list[float]
    steps_done: int
    stopped: bool


class Trainer:
    """One training run, run in segments: between them the caller may render samples or save a
    checkpoint, and `state()` / `load_state()` carry everything needed to continue bit for bit
    (on CPU) in another process: step, RNG, batch order, optimizer, schedule, loss scale, EMA."""

    def __init__(self, backend: FluxBackend, lora: LoraSet, examples: list[Example], config: TrainConfig,
                 text_encoder: TrainableText | None = None, ranks: Ranks | None = None):
        """`text_encoder`: the encoders the LoRA's text-encoder part trains on (text_phase.py).
        `ranks`: this process's place in a data-parallel run (distributed.py), None on its own."""
        check_batch_size(config, examples)
        if ranks is not None:
            check_batch(ranks, config.batch_size, len(examples))
        self.backend, self.lora, self.examples, self.config, self.ranks = backend, lora, examples, config, ranks
        self.text = TextPhase.of(config, lora, text_encoder)
        self.step = 0
        self._losses: list[float] = []
        self._pending: list[torch.Tensor] = []  # losses still on the device
        self._pending_norms: list[torch.Tensor] = []  # and gradient norms
        self.dataset_change = ""  # what load_state found changed in the dataset ('' if nothing)
        self.text_note = ""  # and in the text encoder's phase
        self.generator = torch.Generator().manual_seed(config.seed)
        batch = config.batch_size * (ranks.world if ranks else 1)  # a step's photos, over all processes
        self.sampler = EpochSampler([e.repeats for e in examples], batch, self.generator,
                                    [tuple(e.latents.shape) for e in examples])
        groups = self.text.param_groups(lora) if self.text else [{"params": lora.trainable()}]
        self.params = [p for g in groups for p in g["params"]]
        self.rates = [g.get("lr", config.learning_rate) for g in groups]  # each group's rate before the schedule
        self.optimizer = optimizers.build(config.optimizer, groups, config.learning_rate, config.weight_decay,
                                          config.optimizer_args, config.warmup_steps)
        self.schedule = schedules.build(self.optimizer, config.lr_schedule, config.steps, config.schedule_warmup(),
                                        config.lr_num_cycles, config.lr_power, config.lr_end)
        # fp16 activations underflow in backward: scale the loss (a no-op for bf16 and fp32)
        self.scaler = torch.amp.GradScaler(backend.device.type, enabled=backend.compute_dtype == torch.float16)
        self.ema = [p.detach().clone() for p in self.params] if config.ema_decay else None
        check_examples(config.dop_multiplier, examples)
        self.preservation = Preservation(lora, config.dop_multiplier, backend.device) if config.dop_multiplier \
            else None
        self._preserved: torch.Tensor | None = None  # the last step's preservation loss

    def run(self, until: int | None = None, on_step: Callable[[StepInfo], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> bool:
        """Train up to step `until` (default: all of config.steps). `should_stop()` is checked
        before every step; returns True when it ended the segment early."""
        until = self.config.steps if until is None else min(until, self.config.steps)
        with self.backend.training(self.lora, self.config.memory), ExitStack() as phase:
            embed = None
            while self.step < until:
                if should_stop is not None and should_stop():
                    log.info("Training stopped at step %d of %d.", self.step, self.config.steps)
                    return True
                if embed is None and self.text is not None and self.text.active(self.step):
                    if self.step == self.text.start:
                        log.info("Step %d: the text encoder (%s) starts training at rate %g.", self.step + 1,
                                 ", ".join(self.text.components), self.text.lr)
                    embed = phase.enter_context(self.text.embeddings(self.lora))
                self._step(embed)
                if on_step is not None:
                    on_step(StepInfo(self.step, self.config.steps, self.schedule.get_last_lr()[0], self._pending[-1],
                                     self._preserved))
                if len(self._pending) >= FINITE_CHECK_EVERY:  # one sync every few steps, not every step
                    self._read_losses()
        self._read_losses()  # a NaN is reported before anyone saves this segment's LoRA
        return False

    @property
    def losses(self) -> list[float]:
        self._read_losses()
        return self._losses

    def _read_losses(self) -> None:
        """Bring the pending losses and gradient norms over from the device in one sync; a NaN or
        inf in either stops the run (a NaN gradient with a finite loss would poison the weights)."""
        if not self._pending:
            return
        n, first = len(self._pending), self.step - len(self._pending) + 1
        values = torch.stack([*self._pending, *self._pending_norms]).tolist()
        self._pending, self._pending_norms = [], []
        for k, (loss, norm) in enumerate(zip(values[:n], values[n:])):
            bad = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm) if not math.isfinite(norm) \
                else None
            if bad:
                fp16 = ", or train on bf16 rather than fp16 weights" if self.backend.compute_dtype == torch.float16 \
                    else ""
                raise FloatingPointError(
                    f"The {bad[0]} became {bad[1]} at step {first + k}; lower learning_rate (now "
                    f"{self.config.learning_rate:g}){fp16}. Checkpoints "
                    "saved before this step are intact (no checkpoint is written from non-finite weights).")
            self._losses.append(loss)

    def _step(self, embed: Embed | None = None) -> None:
        rng, queue = self.generator.get_state(), [list(b) for b in self.sampler.queue]
        accumulate, preserve = self.config.gradient_accumulation_steps, self.preservation
        try:
            loss = torch.zeros((), device=self.backend.device)
            if preserve is not None:
                preserve.start_step()
            for _ in range(accumulate):  # gradients of `accumulate` batches add up to one step
                batch = [self.examples[i] for i in self.sampler.next_batch()]
                loss += step_loss(self.backend, batch, self.config, self.generator,
                                  lambda part: self.scaler.scale(part / accumulate), preserve=preserve,
                                  text=embed, lora=self.lora,
                                  share=self.ranks.share(len(batch)) if self.ranks else None) / accumulate
        except BaseException:  # interrupted mid-step (the host may raise from inside the model):
            self.generator.set_state(rng)  # leave the state as after the last whole step, so a
            self.sampler.queue = queue  # checkpoint saved now resumes exactly
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if self.ranks is not None:  # the whole batch's gradients and loss, on every process
            loss, *preserved = self.ranks.reduce_step(self.params, [loss] + ([preserve.total] if preserve else []))
            if preserve is not None:
                preserve.total = preserved[0]
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if self.scaler.is_enabled():  # fp16: an inf gradient is the scaler's to skip, not an error
            norm = torch.zeros_like(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                decay = ema_decay_at(self.config.ema_decay, self.step)
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)
        self.step += 1
        self._pending.append(loss)
        self._preserved = None if preserve is None else preserve.total / accumulate
        self._pending_norms.append(norm.detach().float().reshape(()))

    def result_lora(self) -> LoraSet:
        """The weights to save and sample: the EMA when it is on, a schedule-free optimizer's
        average, else the trained ones."""
        if self.ema is not None:
            return copy.deepcopy(self.lora).copy_from(self.ema)
        if optimizers.has_modes(self.optimizer):
            with optimizers.evaluation_weights(self.optimizer, self.params):
                return copy.deepcopy(self.lora)
        return self.lora

    @contextmanager
    def text_embeddings(self, lora: LoraSet):
        """Inside: how `lora` (e.g. result_lora()) embeds a caption once the text encoder has begun
        training (for the fixed-noise loss), else None: the cached embeddings are the ones."""
        if self.text is None or not self.text.active(self.step):
            yield None
            return
        with self.text.embeddings(lora) as embed:
            yield embed

    def state(self) -> dict:
        """Everything but the examples, as plain tensors and numbers (torch.load(weights_only=True))."""
        return {"step": self.step, "losses": list(self.losses), "generator": self.generator.get_state(),
                "queue": [list(b) for b in self.sampler.queue], "examples": [example_key(e) for e in self.examples],
                "batch": self.sampler.batch_size,
                "lora": {k: v.detach().cpu() for k, v in self.lora.state_dict().items()},
                "variants": self.lora.variants(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": [e.cpu() for e in self.ema] if self.ema else [],
                "eval_weights": self._eval_weights(), "text_phase": self.text.state() if self.text else {}}

    def _eval_weights(self) -> list[torch.Tensor]:
        """A schedule-free optimizer's averaged weights (what its checkpoint's LoRA file holds), else []."""
        if not optimizers.has_modes(self.optimizer):
            return []
        return [p.detach().cpu() for p in self.result_lora().trainable()] if self.ema is None else []

    def load_state(self, state: dict) -> None:
        if state["step"] > self.config.steps:
            raise ValueError(f"The checkpoint is at step {state['step']}, past steps ({self.config.steps}); "
                             "raise steps to continue training it.")
        check_family(state, self.backend.family)
        check_variants(state.get("variants") or {}, self.lora.variants())
        check_resume(self.lora, state["lora"])
        self.lora.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        queue = [list(b) for b in state["queue"]]
        saved = state.get("examples")  # absent in checkpoints of earlier versions: check the indices
        if saved is not None:
            self.dataset_change = dataset_change(saved, self.examples)
        elif any(i >= len(self.examples) for b in queue for i in b):
            self.dataset_change = (f"The dataset has fewer examples ({len(self.examples)}) than the checkpoint's "
                                   "batch order names; training continues on the current examples with a fresh "
                                   "shuffle, from the checkpoint's step, optimizer and LoRA.")
        if self.dataset_change:
            log.warning("%s", self.dataset_change)
            queue = []  # the old batch order names the old dataset's examples: shuffle the current ones
        elif state.get("batch", self.sampler.batch_size) != self.sampler.batch_size:  # another number of processes
            queue = rebatched(queue, self.sampler.batch_size, lambda i: self.sampler.buckets[i])
        self.sampler.queue = queue
        self.step, self._losses, self._pending, self._pending_norms = state["step"], list(state["losses"]), [], []
        self._use_config_rates()
        if self.text is not None:
            self.text_note = self.text.note_resume(state.get("text_phase"), state["step"])
        if self.ema is not None:
            saved = state["ema"] or [p.detach() for p in self.params]
            self.ema = [e.to(p.device, p.dtype).clone() for e, p in zip(saved, self.params)]


    def _use_config_rates(self) -> None:
        """The learning rate and weight decay are this run's settings, not the checkpoint's: resuming
        after a NaN with a lower learning_rate must train at the lower rate."""
        lambdas = getattr(self.schedule, "lr_lambdas", None)
        for i, (group, rate) in enumerate(zip(self.optimizer.param_groups, self.rates, strict=True)):
            group["initial_lr"] = rate
            group["weight_decay"] = self.config.weight_decay
            if lambdas is not None:
                self.schedule.base_lrs[i] = rate
                group["lr"] = rate * lambdas[i](self.schedule.last_epoch)
        if lambdas is not None:
            self.schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def check_variants(saved: dict[str, str], current: dict[str, str]) -> None:
    """A checkpoint resumes only into the variant it trained (checkpoints before variants: lora)."""
    for name, now in current.items():
        then = saved.get(name, "lora")
        if then != now:
            raise ValueError(f"The checkpoint trained {name} as {then}, but this run is set to {now} (layers.variant, "
                             f"the LoRA Layer Group's variant): set the variant back to {then.split()[0]} to resume "
                             "it, or clear resume_from to start a fresh run.")


def train(backend: FluxBackend, lora: LoraSet, examples: list[Example], config: TrainConfig,
          on_step: Callable[[StepInfo], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `lora` on `examples` for `config.steps` optimizer steps, each example appearing
    `example.repeats` times per epoch. `should_stop()` is checked before every step; returning
    True ends the run cleanly with the steps done so far.
    """
    trainer = Trainer(backend, lora, examples, config)
    stopped = trainer.run(on_step=on_step, should_stop=should_stop)
    final = trainer.result_lora()
    if final is not lora:  # the EMA, or a schedule-free optimizer's average
        lora.load_state_dict(final.state_dict())
    return TrainResult(trainer.losses, trainer.step, stopped)


@torch.no_grad()
def fixed_noise_loss(backend: FluxBackend, lora: LoraSet, examples: list[Example], guidance: float = 1.0,
                     sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0,
                     should_stop: Callable[[], bool] = lambda: False, text: Embed | None = None) -> float:
    """The loss on a fixed set of (σ, ε) pairs per example: comparable before and after training,
    unlike the noisy per-step loss. NaN when `should_stop()` cut it short. `text`: how a trained
    text encoder embeds the captions (Trainer.text_embeddings), else the cached embeddings."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with backend.lora_applied(lora):
        for e in examples:
            latents = e.latents[None].to(backend.device)
            cond = Conditioning.of([text(e.caption, e.context, e.pooled) if text else (e.context, e.pooled)],
                                   guidance, () if e.control is None else (e.control[None],)).to(backend.device)
            for s in sigmas:
                if should_stop():
                    return float("nan")
                noise = torch.randn(latents.shape, generator=generator).to(backend.device)
                sigma = torch.tensor([s])
                v = backend.velocity(flow.noisy_latents(latents, noise, sigma.to(backend.device)), sigma, cond)
                total += flow.flow_matching_loss(v, flow.velocity_target(latents, noise)).item()
                count += 1
    return total / count
