"""Rectified-flow maths for FLUX, in the notation of the papers.

A clean latent z and Gaussian noise ε are joined on a straight line,

    z_σ = (1 − σ)·z + σ·ε,        σ ∈ [0, 1],

and the transformer learns the velocity along that line, v = ε − z, with a
mean-squared error. σ is also the timestep FLUX is conditioned on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIMESTEP_SAMPLINGS = ("flux_shift", "logit_normal", "uniform")


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """z_σ = (1 − σ)·z + σ·ε, with one σ per sample."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − z: the direction from the image to the noise."""
    return noise - latents


def flow_matching_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error between predicted and true velocity (shape [B])."""
    return (v_pred.float() - v_target.float()).square().flatten(1).mean(dim=1)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: μ grows linearly with the number of image tokens
    (0.5 at 256 tokens = 512², 1.15 at 4096 tokens = 1024²)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """σ = e^μ / (e^μ + 1/t − 1): moves timesteps towards the noisy end for larger images."""
    t = t.clamp(1e-6, 1.0)
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


@dataclass(frozen=True)
class TimestepSampling:
    """How training picks σ.

    uniform:      σ ~ U(0, 1).
    logit_normal: σ = sigmoid(n), n ~ N(mean, std) (SD3 / diffusers' default).
    flux_shift:   logit-normal, then FLUX's shift for the image's token count (kohya's
                  `flux_shift`): larger images train at noisier σ, as they are sampled.
    """

    mode: str = "flux_shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.mode not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling is {self.mode!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}.")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std is {self.logit_std}; it must be above 0 (1.0 is the usual value).")

    def sample(self, n: int, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
        if self.mode == "uniform":
            return torch.rand(n, generator=generator)
        normal = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
        sigmas = torch.sigmoid(normal)
        if self.mode == "flux_shift":
            sigmas = time_shift(flux_mu(image_seq_len), sigmas)
        return sigmas


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Number of image tokens FLUX makes from a latent: one per 2×2 patch."""
    return (latent_height // patch_size) * (latent_width // patch_size)


def sampling_sigmas(steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """The σ schedule FLUX samples with: 1 → 0 in `steps` Euler steps, shifted like training."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    if not shift:
        return t
    sigmas = time_shift(flux_mu(image_seq_len), t[:-1])
    return torch.cat([sigmas, t[-1:]])
