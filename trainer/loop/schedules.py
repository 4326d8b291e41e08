"""Learning-rate schedules with warmup, by diffusers' names, from diffusers' `get_scheduler`.

Each is a LambdaLR: the learning rate before optimizer step k (0-based) is learning_rate · factor(k),
and the schedule steps once per optimizer step, so its state_dict (the step count) is all a resume
needs. diffusers' warmup starts at 0: the first step of a warmup trains at learning rate 0.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def diffusers_name(name: str, warmup_steps: int) -> str:
    """Our "constant" warms up when given warmup steps (as it always has here); diffusers' does not."""
    return "constant_with_warmup" if name == "constant" and warmup_steps > 0 else name


def build(optimizer: torch.optim.Optimizer, name: str, steps: int, warmup_steps: int = 0, num_cycles: int = 1,
          power: float = 1.0, lr_end: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule `name` over `steps` optimizer steps. polynomial decays from the optimizer's
    learning rate to `lr_end` (an absolute rate, as SimpleTuner's --lr_end) with exponent `power`;
    cosine_with_restarts runs `num_cycles` hard restarts."""
    name = diffusers_name(name, warmup_steps)
    if name == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(optimizer, warmup_steps, steps, lr_end=lr_end, power=power)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps,
                         num_cycles=num_cycles, power=power)


@lru_cache(maxsize=32)
def _factor_function(name: str, lr: float, steps: int, warmup_steps: int, num_cycles: int, power: float,
                     lr_end: float):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return build(optimizer, name, steps, warmup_steps, num_cycles, power, lr_end).lr_lambdas[0]


def factor(name: str, step: int, lr: float, steps: int, warmup_steps: int = 0, num_cycles: int = 1,
           power: float = 1.0, lr_end: float = 0.0) -> float:
    """The multiplier of the learning rate before optimizer step `step` (0-based)."""
    return float(_factor_function(name, lr, steps, warmup_steps, num_cycles, power, lr_end)(step))
