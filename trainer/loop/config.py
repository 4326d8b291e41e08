"""The settings of a training run (TrainConfig), checked as they are made: every bad value is a
clear error naming the setting, before anything is loaded or written."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from . import flow, optimizers, schedules
from .losses import LossSettings
from .memory import MemoryConfig

LR_SCHEDULES = schedules.LR_SCHEDULES


def _finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole_number(value) -> bool:
    return _finite_number(value) and float(value).is_integer()


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
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # checkpointing, block swap, compile
    ema_decay: float = 0.0  # 0 = off; 0.999 in ai-toolkit recipes: the saved LoRA is the average
    optimizer: str = "adamw"  # a name of optimizers.OPTIMIZERS (other tools' spellings are accepted)
    optimizer_args: dict = field(default_factory=dict)  # extra keyword arguments (kohya's --optimizer_args)
    gradient_accumulation_steps: int = 1  # batches whose gradients add up to one optimizer step
    lr_num_cycles: int = 1  # hard restarts of cosine_with_restarts (diffusers' --lr_num_cycles)
    lr_power: float = 1.0  # exponent of the polynomial schedule (diffusers' --lr_power)
    lr_end: float = 4e-7  # learning rate the polynomial schedule ends at (SimpleTuner's --lr_end)
    loss: LossSettings = field(default_factory=LossSettings)  # mse, l1, huber…, and its weighting over σ
    dop_multiplier: float = 0.0  # differential output preservation's loss weight (ai-toolkit's 1.0); 0 = off
    dop_class: str = ""  # the class word DOP puts in place of the trigger; '' = each subject's class word
    text_encoder_lr: float = 0.0  # the text encoder LoRA's learning rate; 0: the text encoder is not trained
    text_encoder_start: float = 0.0  # when it starts training: a fraction of steps if below 1 (0.85), else a step
    text_encoder_rank: int = 0  # rank of its LoRA; 0: the transformer LoRA's rank (and alpha)
    text_encoder_t5: bool = False  # also train T5-XXL (False: CLIP-L only, as diffusers does)

    def __post_init__(self):
        checks = [  # each a whole number or finite value first (inf, NaN and 2.5 steps compare silently)
            (_whole_number(self.steps) and self.steps >= 1,
             f"steps is {self.steps}; train a whole number of steps, at least 1 (500–3000 is usual)."),
            (_finite_number(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate is {self.learning_rate}; use a positive finite value (1e-4 is usual)."),
            (_whole_number(self.batch_size) and self.batch_size >= 1,
             f"batch_size is {self.batch_size}; use a whole number, at least 1 (1 is usual)."),
            (_whole_number(self.seed) and self.seed >= 0,
             f"seed is {self.seed}; use a whole number, 0 or more (e.g. 42)."),
            (_finite_number(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay is {self.weight_decay}; use a finite value, 0 or more (1e-4 is usual)."),
            (_finite_number(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"max_grad_norm is {self.max_grad_norm}; use 0 to disable clipping, or 1.0."),
            (_finite_number(self.guidance) and self.guidance >= 0,
             f"guidance is {self.guidance}; use a finite value, 0 or more (1.0 is usual for training FLUX.1-dev)."),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule is {self.lr_schedule!r}; choose {', '.join(LR_SCHEDULES)}."),
            (self.warmup_steps == 0 or 0 < self.warmup_steps < self.steps,
             f"warmup_steps is {self.warmup_steps}; keep it between 0 and steps ({self.steps})."),
            (_finite_number(self.ema_decay) and 0 <= self.ema_decay < 1,
             f"ema_decay is {self.ema_decay}; use 0 (off) or a value like 0.999."),
            (_finite_number(self.dop_multiplier) and self.dop_multiplier >= 0,
             f"dop_multiplier is {self.dop_multiplier}; use 0 (off) or a positive weight (0.5–1.0 is usual, "
             "1.0 is ai-toolkit's diff_output_preservation_multiplier)."),
            (isinstance(self.dop_class, str) and "[trigger" not in self.dop_class,
             f"dop_class is {self.dop_class!r}; give the class word itself ('person', 'dog'), or leave it empty "
             "for the dataset's class word."),
        ]
        for ok, message in checks + self._optimisation_checks() + self._text_encoder_checks():
            if not ok:
                raise ValueError(message)
        self.steps, self.batch_size, self.seed = int(self.steps), int(self.batch_size), int(self.seed)
        self.text_encoder_rank = int(self.text_encoder_rank)
        optimizers.check(self.optimizer, self.optimizer_args)

    def _optimisation_checks(self) -> list[tuple[bool, str]]:
        """The optimizer, schedule and loss settings; normalises the optimizer's name."""
        self.optimizer = optimizers.canonical(self.optimizer)
        schedule_free = optimizers.kind(self.optimizer).own_warmup
        return [
            (_whole_number(self.gradient_accumulation_steps) and self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps is {self.gradient_accumulation_steps}; use 1 (off) or more."),
            (_whole_number(self.lr_num_cycles) and self.lr_num_cycles >= 1,
             f"lr_num_cycles is {self.lr_num_cycles}; use 1 or more restarts."),
            (_finite_number(self.lr_power) and self.lr_power > 0,
             f"lr_power is {self.lr_power}; use a value above 0 (1.0 decays linearly)."),
            (_finite_number(self.lr_end)
             and (self.lr_schedule != "polynomial" or 0 <= self.lr_end < self.learning_rate),
             f"lr_end is {self.lr_end:g} with learning_rate {self.learning_rate:g}; the polynomial schedule decays "
             "from learning_rate down to lr_end, so lr_end must be lower (4e-7 is SimpleTuner's)."),
            (not schedule_free or self.lr_schedule in ("constant", "constant_with_warmup"),
             f"lr_schedule is {self.lr_schedule!r} with optimizer {self.optimizer}, which replaces the decay "
             "schedule; set lr_schedule to constant (warmup_steps still warm it up)."),
            (self.timesteps.mode != "weighted" or self.loss.weighting == "none",
             f"loss_weighting is {self.loss.weighting!r} with timestep_sampling weighted, which weights the loss "
             "already (ai-toolkit's bell curve); set loss_weighting to none, or pick another timestep_sampling."),
        ]

    def preservation_class(self) -> str | None:
        """What differential output preservation puts in place of the trigger word, for
        encode_dataset: dop_class, '' for each subject's own class word, None when DOP is off."""
        return self.dop_class.strip() if self.dop_multiplier > 0 else None
    def _text_encoder_checks(self) -> list[tuple[bool, str]]:
        start = self.text_encoder_start
        valid_start = _finite_number(start) and (0 <= start < 1 or (start >= 1 and float(start).is_integer()))
        checks = [
            (_finite_number(self.text_encoder_lr) and self.text_encoder_lr >= 0,
             f"text_encoder_lr is {self.text_encoder_lr}; use 0 (the text encoder is not trained) or a small "
             "positive rate (5e-6 to 3e-5)."),
            (valid_start, f"text_encoder_start is {start}; use a fraction of the steps below 1 (0.85: the last 15%) "
                          "or a whole step number (5950), 0 to train the text encoder from the first step."),
            (_whole_number(self.text_encoder_rank) and self.text_encoder_rank >= 0,
             f"text_encoder_rank is {self.text_encoder_rank}; use 0 (the transformer LoRA's rank) or a whole "
             "number like 8 or 16."),
            (isinstance(self.text_encoder_t5, bool),
             f"text_encoder_t5 is {self.text_encoder_t5!r}; use true or false."),
        ]
        if all(ok for ok, _ in checks) and self.text_encoder_lr > 0:
            first = self.text_encoder_start_step()
            checks.append((first < self.steps,
                           f"text_encoder_start is {start:g}: step {first}, at or past steps ({self.steps}), so the "
                           f"text encoder would never train; use a fraction like 0.85 or a step below {self.steps}."))
        return checks

    def text_encoder_start_step(self) -> int:
        """The first (0-based) optimizer step that trains the text encoder: text_encoder_start of the
        steps when a fraction (0.85 of 7000: 5950), else the step it names."""
        start = self.text_encoder_start
        return round(start * self.steps) if start < 1 else int(start)

    def schedule_warmup(self) -> int:
        """Warmup steps of the learning-rate schedule: none when the optimizer warms up itself."""
        return 0 if optimizers.kind(self.optimizer).own_warmup else self.warmup_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate before optimizer step `step` (0-based), by diffusers' schedules."""
        return schedules.factor(self.lr_schedule, step, self.learning_rate, self.steps, self.schedule_warmup(),
                                self.lr_num_cycles, self.lr_power, self.lr_end)


def check_batch_size(config: TrainConfig, examples: list) -> None:
    """Before anything is loaded: a batch can't hold more examples than the dataset has."""
    if not examples:
        raise ValueError("There are no training examples; the dataset is empty.")
    if config.batch_size > len(examples):
        raise ValueError(f"batch_size is {config.batch_size} but the dataset has {len(examples)} image(s); "
                         f"use batch_size {len(examples)} or less (1 is usual), or add images.")
