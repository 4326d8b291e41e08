"""The text encoder's phase of a run: ai-toolkit recipes' late text-encoder finetune (off for the
first ~85% of the steps, then on at a low rate), or diffusers' `--train_text_encoder` when it
starts at step 0.

The text encoder's LoRA is part of the run's LoraSet from the first step, and of the optimizer as
a parameter group of its own (rate `text_encoder_lr`, shaped by the same lr_schedule), so a
checkpoint from either side of the start resumes exactly. Its up matrices start at zero, so it
changes nothing, and it gets no gradient (the optimizer skips it) until `text_encoder_start`.
Before that, steps read the cached caption embeddings; from it on, each step's captions go
through the encoders with the LoRA attached, with grad: the cache never stands in for them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..log import logger
from ..lora import text_encoder
from ..lora.targets import LayerSpec, LoraTarget
from ..lora.text_encoder import TEXT_COMPONENTS, TrainableText
from ..lora.weights import LoraSet
from .config import TrainConfig

log = logger(__name__)

# (caption, cached context, cached pooled) -> (context, pooled) for this step
Embed = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def text_targets(config: TrainConfig, text: TrainableText | None, spec: LayerSpec) -> list[LoraTarget]:
    """The text-encoder LoRA a run trains (none when text_encoder_lr is 0): CLIP-L, and T5-XXL with
    text_encoder_t5, at text_encoder_rank (alpha = rank), or with 0 the transformer LoRA's rank and
    alpha (its largest group's)."""
    if config.text_encoder_lr == 0:
        return []
    if text is None:
        raise ValueError(f"text_encoder_lr is {config.text_encoder_lr:g}, but there is no text encoder to train: "
                         "connect the model's CLIP, or set text_encoder_lr to 0.")
    rank, alpha = config.text_encoder_rank, None
    if rank == 0:
        group = max(spec.groups, key=lambda g: g.rank)
        rank, alpha = group.rank, group.alpha
    return text_encoder.targets(text, text_encoder.components(config.text_encoder_t5), rank, alpha)


class TextPhase:
    def __init__(self, config: TrainConfig, lora: LoraSet, text: TrainableText):
        self.components = [c for c in lora.components() if c in TEXT_COMPONENTS]
        self.text, self.lr, self.start = text, config.text_encoder_lr, config.text_encoder_start_step()

    @classmethod
    def of(cls, config: TrainConfig, lora: LoraSet, text: TrainableText | None) -> "TextPhase | None":
        """The run's text phase, or None when it trains no text encoder."""
        trained = [c for c in lora.components() if c in TEXT_COMPONENTS]
        if not trained and config.text_encoder_lr == 0:
            return None
        if not trained:
            raise ValueError(f"text_encoder_lr is {config.text_encoder_lr:g} but the LoRA has no text-encoder "
                             "layers; build its targets with text_phase.text_targets.")
        if config.text_encoder_lr == 0:
            raise ValueError("The LoRA has text-encoder layers but text_encoder_lr is 0; set text_encoder_lr "
                             "(5e-6 to 3e-5) or build the LoRA without them.")
        if text is None:
            raise ValueError(f"text_encoder_lr is {config.text_encoder_lr:g}, but no text encoder was handed to "
                             "the trainer to train.")
        return cls(config, lora, text)

    def active(self, step: int) -> bool:
        """Whether (0-based) optimizer step `step` trains the text encoder."""
        return step >= self.start

    def param_groups(self, lora: LoraSet) -> list[dict]:
        """The transformer's parameters, then the text encoders' with their own rate: together in
        the LoraSet's own order (what an EMA or a checkpoint lists), so its targets put the
        transformer's first."""
        groups = [{"params": lora.transformer().trainable()},
                  {"params": lora.part(*self.components).trainable(), "lr": self.lr}]
        if [id(p) for g in groups for p in g["params"]] != [id(p) for p in lora.trainable()]:
            raise ValueError("The LoRA's text-encoder targets come before some of the transformer's; list the "
                             "transformer's targets first (spec.targets(...) + text_targets(...)).")
        return groups

    @contextmanager
    def embeddings(self, lora: LoraSet) -> Iterator[Embed]:
        """Inside: a function giving a caption's embeddings through the encoders with `lora`'s text
        weights (with grad when grad is on); the parts of encoders not trained come from the cache."""
        with text_encoder.applied(self.text, lora):
            def embed(caption: str, context: torch.Tensor, pooled: torch.Tensor):
                live_context, live_pooled = self.text.encode(caption, self.components)
                return (context if live_context is None else live_context,
                        pooled if live_pooled is None else live_pooled)
            yield embed

    def state(self) -> dict:
        return {"start": self.start, "components": list(self.components)}

    def note_resume(self, saved: dict | None, step: int) -> str:
        """What changed about the phase since the checkpoint ('' if nothing)."""
        if not saved or (saved["start"], list(saved["components"])) == (self.start, self.components):
            return ""
        note = (f"The text encoder's phase changed since the checkpoint (step {step}): it trained "
                f"{', '.join(saved['components'])} from step {saved['start']}, now {', '.join(self.components)} from "
                f"step {self.start}.")
        log.warning("%s", note)
        return note


def check_resume(lora: LoraSet, saved: dict) -> None:
    """A checkpoint's LoRA has the same text-encoder parts as this run's: else a clear error."""
    ours = {c for c in lora.components() if c in TEXT_COMPONENTS}
    theirs = {k.split(".", 2)[1].split("__", 1)[0] for k in saved} & set(TEXT_COMPONENTS)  # weights.<name>.down
    if ours != theirs:
        had = ", ".join(sorted(theirs)) or "no text encoder"
        now = ", ".join(sorted(ours)) or "no text encoder"
        raise ValueError(f"The checkpoint's LoRA trained {had}, this run trains {now}: resume with the checkpoint's "
                         "text_encoder_lr and text_encoder_t5 (0 / false when it trained none), or start a new run.")
