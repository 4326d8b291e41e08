"""Differential output preservation (DOP, ai-toolkit's `diff_output_preservation`).

Training a trigger word also moves what its class word means: after a run on "sks person", every
"person" starts to look like the subject. DOP holds the class word in place. Each step, besides
the subject's loss, it asks the model about the caption with the trigger word replaced by the
class word ("a photo of sks person" -> "a photo of person"; encoded once with the dataset, see
encode.py), on the same noisy latents and σ:

    target  = v_frozen(z_σ, σ, class caption)     LoRA off, no gradient
    loss   += multiplier · mean((v_lora(z_σ, σ, class caption) − target)²)

so the LoRA learns the trigger while its prediction for the class caption stays the frozen
model's. As in ai-toolkit the term is a plain MSE, whatever loss and σ weighting the subject's
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

    def per_sample(self, backend: FluxBackend, noisy: torch.Tensor, sigmas: torch.Tensor,
                   cond: Conditioning) -> torch.Tensor:
        """multiplier × the MSE (per sample, shape [B]) between the LoRA's and the frozen model's
        velocity for the class captions (`cond`); only the LoRA's side has a graph."""
        with torch.no_grad(), self.lora.disabled():
            target = backend.velocity(noisy, sigmas, cond)
        v_pred = backend.velocity(noisy, sigmas, cond)
        return self.multiplier * (v_pred.float() - target.float()).square().flatten(1).mean(dim=1)

    def backward(self, backend: FluxBackend, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                 batch_size: int, scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The term of a group of `batch_size` photos, its gradients added into the LoRA's (through
        `scale`, as the subject's loss: gradient accumulation, fp16 loss scaling)."""
        term = self.per_sample(backend, noisy, sigmas, cond).sum() / batch_size
        scale(term).backward()
        self.total += term.detach()


def check_examples(multiplier: float, examples: list) -> None:
    """With DOP on, the examples must have been encoded with their class captions."""
    if multiplier > 0 and not any(e.preserve for e in examples):
        raise ValueError(f"dop_multiplier is {multiplier:g}, but no example has a class caption: encode the dataset "
                         "with encode_dataset(..., dop_class=config.preservation_class()), or set dop_multiplier "
                         "to 0.")
