"""Optimizers by the names the training tools use, each built from the library that implements it.

No optimizer maths lives here: one table maps a name to (package, constructor, notes), and `build`
imports the package only when that optimizer is asked for, so a missing optional one (bitsandbytes)
costs nothing until someone picks it, and then says how to install it.

Schedule-free optimizers keep two sets of weights: the ones they step (train mode) and the average
to evaluate and save (eval mode). `evaluation_weights` switches to the latter for a render or a
checkpoint and back again bit for bit, so a run that paused continues exactly as one that did not.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass(frozen=True)
class OptimizerKind:
    package: str  # what `pip install` takes
    module: str
    constructor: str
    notes: str
    defaults: dict = field(default_factory=dict)  # passed besides lr and weight_decay; optimizer_args override
    own_warmup: bool = False  # warms the learning rate itself (warmup_steps go to the optimizer, not the schedule)
    probe: bool = False  # step it once on a tiny tensor first: it may import yet not run on this machine


OPTIMIZERS = {
    "adamw": OptimizerKind(
        "torch", "torch.optim", "AdamW",
        "PyTorch's AdamW: the usual choice (diffusers, mflux, kohya). learning_rate 1e-4."),
    "adamw8bit": OptimizerKind(
        "bitsandbytes", "bitsandbytes.optim", "AdamW8bit",
        "AdamW with 8-bit moment estimates (ai-toolkit's `optimizer: adamw8bit`): a quarter of AdamW's "
        "optimizer memory, about the same results. learning_rate 1e-4.", probe=True),
    "adafactor": OptimizerKind(
        "transformers", "transformers.optimization", "Adafactor",
        "Adafactor with a fixed learning rate (as ai-toolkit and kohya run it for LoRAs): factored second "
        "moments, least memory. learning_rate 1e-4.",
        defaults={"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    "prodigy": OptimizerKind(
        "prodigyopt", "prodigyopt", "Prodigy",
        "Prodigy finds its own step size: set learning_rate to 1.0 (it is a multiplier) and use a constant "
        "or cosine schedule."),
    "lion": OptimizerKind(
        "lion-pytorch", "lion_pytorch", "Lion",
        "Lion (sign of the momentum): half AdamW's optimizer memory; use a 3–10× lower learning_rate "
        "(1e-5–3e-5) and a 3–10× higher weight_decay."),
    "adamw_schedulefree": OptimizerKind(
        "schedulefree", "schedulefree", "AdamWScheduleFree",
        "Schedule-free AdamW (SimpleTuner's `adamw_schedulefree`): no decay schedule needed, keep lr_schedule "
        "constant; warmup_steps warm the optimizer itself. Saves and renders its averaged weights.",
        own_warmup=True),
}

# how other tools spell them (kohya's --optimizer_type, SimpleTuner's --optimizer, ai-toolkit's optimizer)
ALIASES = {"adamw_8bit": "adamw8bit", "bnb-adamw8bit": "adamw8bit", "adamw8bitoptimizer": "adamw8bit",
           "adamwschedulefree": "adamw_schedulefree", "schedulefree": "adamw_schedulefree",
           "optimi-lion": "lion", "lion8bit": "lion", "prodigyopt": "prodigy", "adamw_torch": "adamw"}


def canonical(name: str) -> str:
    """Our name for an optimizer name as any of the tools writes it ('AdamW8bit', 'bnb-adamw8bit')."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer is {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    return key


def kind(name: str) -> OptimizerKind:
    return OPTIMIZERS[canonical(name)]


class MissingPackage(ValueError, RuntimeError):
    """An optimizer whose library does not import here: a bad setting for this machine (a config
    naming it is told so by key), with the command that installs it."""


def constructor(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class, imported now; a missing package is named with the command that installs it."""
    k = kind(name)
    try:
        module = importlib.import_module(k.module)
    except Exception as e:  # bitsandbytes can fail with more than ImportError (no CUDA libraries)
        raise MissingPackage(
            f"optimizer {canonical(name)!r} needs the {k.package} package, which does not import here "
            f"({type(e).__name__}: {e}). Install it into ComfyUI's Python with `pip install {k.package}`, "
            "or choose optimizer adamw.") from e
    return getattr(module, k.constructor)


def parse_args(text: str) -> dict:
    """kohya's `--optimizer_args` style: 'betas=0.9,0.99 d_coef=2 use_bias_correction=True' → a dict."""
    args = {}
    for item in text.replace(";", " ").split():
        key, sep, value = item.rstrip(",").partition("=")  # pairs may be comma-separated too
        if not sep or not key:
            raise ValueError(f"optimizer_args has {item!r}; write key=value pairs separated by spaces, e.g. "
                             "'betas=0.9,0.99 eps=1e-8'.")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = value  # a word, e.g. a mode name
    return args


def check(name: str, args: dict) -> None:
    """The optimizer imports and takes every key of `args`; else a clear error before anything runs."""
    cls = constructor(name)
    taken = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = [k for k in args if k not in taken]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()):
        raise ValueError(f"optimizer_args has {', '.join(map(repr, unknown))}, which {cls.__name__} does not take; "
                         f"it takes {', '.join(taken)}.")


def build(name: str, params: list, lr: float, weight_decay: float, args: dict | None = None,
          warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (parameters, or parameter groups: dicts with "params" and
    the settings that differ, such as a text encoder's "lr"), put in training mode."""
    k, cls = kind(name), constructor(name)
    kwargs = {"lr": lr, "weight_decay": weight_decay, **k.defaults, **(args or {})}
    if k.own_warmup:
        kwargs.setdefault("warmup_steps", warmup_steps)
    flat = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    if cls is torch.optim.AdamW and "fused" not in kwargs:
        kwargs["fused"] = all(p.is_cuda for p in flat) or None
    if k.probe:
        _probe(cls, kwargs, flat[0].device, name)
    optimizer = cls(params, **kwargs)
    if has_modes(optimizer):
        optimizer.train()
    return optimizer


def _probe(cls, kwargs: dict, device: torch.device, name: str) -> None:
    """One step on a throwaway tensor big enough for the 8-bit path: it imports, but does it run here?"""
    p = torch.nn.Parameter(torch.zeros(64, 64, device=device))
    p.grad = torch.ones_like(p)
    try:
        cls([p], **kwargs).step()
    except Exception as e:
        raise RuntimeError(
            f"optimizer {canonical(name)!r} imports but does not run on {device} ({type(e).__name__}: {e}). "
            f"Update it with `pip install -U {kind(name).package}`, or choose optimizer adamw.") from e


def has_modes(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers have train()/eval(); PyTorch's have neither."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside, `params` hold the weights to evaluate and save (a schedule-free optimizer's average);
    after, exactly the training weights again (restored, not recomputed, so no rounding creeps in)."""
    if not has_modes(optimizer):
        yield
        return
    training = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, t in zip(params, training):
                p.copy_(t)
        for group in optimizer.param_groups:  # the weights are the training ones again
            group["train_mode"] = True
