"""The training loop: read in one sitting.

Examples arrive already encoded (latents and text embeddings), so a step is only the transformer:
draw σ and ε, noise the latents, predict the velocity, step AdamW on the LoRA.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import flow
from .backends import FluxBackend
from .data import Example
from .lora import LoraSet

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 42
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    guidance: float = 1.0  # what guidance-distilled models (dev) are told while training
    timesteps: flow.TimestepSampling = field(default_factory=flow.TimestepSampling)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = True

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps is {self.steps}; train at least 1 step (500–3000 is usual)."),
            (self.learning_rate > 0, f"learning_rate is {self.learning_rate}; use a positive value (1e-4 is usual)."),
            (self.batch_size >= 1, f"batch_size is {self.batch_size}; it must be at least 1."),
            (self.weight_decay >= 0, f"weight_decay is {self.weight_decay}; it can't be negative."),
            (self.max_grad_norm >= 0, f"max_grad_norm is {self.max_grad_norm}; use 0 to disable clipping, or 1.0."),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule is {self.lr_schedule!r}; choose {', '.join(LR_SCHEDULES)}."),
            (self.warmup_steps == 0 or 0 < self.warmup_steps < self.steps,
             f"warmup_steps is {self.warmup_steps}; keep it between 0 and steps ({self.steps})."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate before optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float


@dataclass
class TrainResult:
    losses: list[float]
    steps_done: int
    stopped: bool


class EpochSampler:
    """Batches of example indices: each epoch a fresh seeded shuffle, every example once."""

    def __init__(self, weights: list[int], batch_size: int, generator: torch.Generator):
        self.pool = [i for i, n in enumerate(weights) for _ in range(n)]
        self.batch_size, self.generator, self.queue = batch_size, generator, []

    def next_batch(self) -> list[int]:
        while len(self.queue) < self.batch_size:
            self.queue += [self.pool[i] for i in torch.randperm(len(self.pool), generator=self.generator).tolist()]
        batch, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return batch


def _groups(examples: list[Example]) -> list[list[Example]]:
    """Split a batch into stackable groups: same latent shape and text length."""
    groups: dict[tuple, list[Example]] = {}
    for e in examples:
        groups.setdefault((tuple(e.latents.shape), e.context.shape[0]), []).append(e)
    return list(groups.values())


def _stack(examples: list[Example]):
    return (torch.stack([e.latents for e in examples]), torch.stack([e.context for e in examples]),
            torch.stack([e.pooled for e in examples]))


def step_loss(backend: FluxBackend, batch: list[Example], config: TrainConfig, generator: torch.Generator,
              scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> float:
    """Forward and backward one batch; returns its mean loss. Gradients accumulate in the LoRA."""
    total = 0.0
    for group in _groups(batch):
        latents, context, pooled = _stack(group)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = config.timesteps.sample(len(group), flow.image_seq_len(*latents.shape[-2:]), generator)
        latents, noise = latents.to(backend.device), noise.to(backend.device)
        v_pred = backend.velocity(flow.noisy_latents(latents, noise, sigmas.to(backend.device)), sigmas,
                                  context, pooled, config.guidance)
        loss = flow.flow_matching_loss(v_pred, flow.velocity_target(latents, noise)).sum() / len(batch)
        scale(loss).backward()
        total += loss.item()
    return total


def make_optimizer(lora: LoraSet, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in lora.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             fused=fused or None)


def train(backend: FluxBackend, lora: LoraSet, examples: list[Example], config: TrainConfig,
          on_step: Callable[[StepInfo], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `lora` on `examples` for `config.steps` optimizer steps, each example appearing
    `example.repeats` times per epoch. `should_stop()` is checked before every step; returning
    True ends the run cleanly with the steps done so far.
    """
    if not examples:
        raise ValueError("There are no training examples; the dataset is empty.")
    generator = torch.Generator().manual_seed(config.seed)
    sampler = EpochSampler([e.repeats for e in examples], config.batch_size, generator)
    optimizer = make_optimizer(lora, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    # fp16 activations underflow in backward: scale the loss (a no-op for bf16 and fp32)
    scaler = torch.amp.GradScaler(backend.device.type, enabled=backend.compute_dtype == torch.float16)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []

    with backend.training(lora, config.gradient_checkpointing):
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                log.info("Training stopped at step %d of %d.", step, config.steps)
                return TrainResult(losses, step, stopped=True)
            batch = [examples[i] for i in sampler.next_batch()]
            loss = step_loss(backend, batch, config, generator, scaler.scale)
            if not math.isfinite(loss):
                raise FloatingPointError(f"The loss became {loss} at step {step + 1}; lower learning_rate "
                                         f"(now {config.learning_rate:g}), or train on bf16 rather than fp16 "
                                         "weights.")
            scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if on_step is not None:
                on_step(StepInfo(step + 1, config.steps, loss, schedule.get_last_lr()[0]))
    return TrainResult(losses, config.steps, stopped=False)


@torch.no_grad()
def fixed_noise_loss(backend: FluxBackend, lora: LoraSet, examples: list[Example], guidance: float = 1.0,
                     sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0) -> float:
    """The loss on a fixed set of (σ, ε) pairs per example: comparable before and after training,
    unlike the noisy per-step loss."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with backend.lora_applied(lora):
        for e in examples:
            latents = e.latents[None].to(backend.device)
            for s in sigmas:
                noise = torch.randn(latents.shape, generator=generator).to(backend.device)
                sigma = torch.tensor([s])
                v = backend.velocity(flow.noisy_latents(latents, noise, sigma.to(backend.device)), sigma,
                                     e.context[None], e.pooled[None], guidance)
                total += flow.flow_matching_loss(v, flow.velocity_target(latents, noise)).item()
                count += 1
    return total / count
