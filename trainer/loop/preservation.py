"""Differential output preservation (DOP, ai-toolkit's `diff_output_preservation`).

Training a trigger word also moves what its class word means: after a run on "sks person", every
"person" starts to look like the subject. DOP holds the class word in place. Each step, besides
the subject's loss, it asks the model about the caption with the trigger word replaced by the
class word ("a photo of sks person" -> "a photo of person"; encoded once with the dataset, see
encode.py), on the same noisy latents and σ:

    target  = v_frozen(z_σ, σ, class caption)     LoRA off, no gradient
    loss   += multiplier · mean((v_lora(z_σ, σ, class caption) − target)²)

so the LoRA learns the trigger while its prediction for the class caption stays the frozen
model's. While the text encoder trains (text_phase.py), the LoRA's side reads the class caption
through the trained encoder, live and with grad, as the subject's captions are, so the term pulls
on the text encoder's LoRA too; the target stays the frozen model with the frozen encoder's
embeddings (the cache), the LoRA off everywhere, as ai-toolkit's network multiplier 0.
As in ai-toolkit the term is a plain MSE, whatever loss and σ weighting the subject's
loss uses, and its weight does not depend on the photo's loss weight. It costs two more forward
passes (one without a graph) and one more backward per subject photo per step. Regularisation
photos, which carry no trigger word, have no such term.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..families.backend import FluxBackend
from ..families.conditioning import Conditioning
from ..lora.weights import LoraSet


class Preservation:
    """The DOP term of one run; `total` adds up this step's preservation loss (on the device)."""

    def __init__(self, lora: LoraSet, multiplier: float, device: torch.device):
        self.lora, self.multiplier, self.device = lora, multiplier, device
        self.total = torch.zeros((), device=device)

    def start_step(self) -> None:
        self.total = torch.zeros((), device=self.device)

    def per_sample(self, backend: FluxBackend, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                   live: Conditioning | None = None) -> torch.Tensor:
        """multiplier × the MSE (per sample, shape [B]) between the LoRA's and the frozen model's
        velocity for the class captions; only the LoRA's side has a graph. `cond`: the frozen
        encoder's embeddings (the target's); `live`: the trained encoder's, for the LoRA's side in
        the text encoder's phase (else the frozen ones)."""
        with torch.no_grad(), self.lora.disabled():
            target = backend.velocity(noisy, sigmas, cond)
        v_pred = backend.velocity(noisy, sigmas, live or cond)
        return self.multiplier * (v_pred.float() - target.float()).square().flatten(1).mean(dim=1)

    def backward(self, backend: FluxBackend, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                 batch_size: int, scale: Callable[[torch.Tensor], torch.Tensor],
                 live: Conditioning | None = None) -> None:
        """The term of a group of `batch_size` photos, its gradients added into the LoRA's (through
        `scale`, as the subject's loss: gradient accumulation, fp16 loss scaling)."""
        term = self.per_sample(backend, noisy, sigmas, cond, live).sum() / batch_size
        scale(term).backward()
        self.total += term.detach()


def check_examples(multiplier: float, examples: list) -> None:
    """With DOP on, the examples must have been encoded with their class captions."""
    if multiplier > 0 and not any(e.preserve for e in examples):
        raise ValueError(f"dop_multiplier is {multiplier:g}, but no example has a class caption: encode the dataset "
                         "with encode_dataset(..., dop_class=config.preservation_class()), or set dop_multiplier "
                         "to 0.")
