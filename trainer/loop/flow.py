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
from diffusers.training_utils import compute_density_for_timestep_sampling

TIMESTEP_SAMPLINGS = ("flux_shift", "logit_normal", "uniform", "sigmoid", "weighted", "mode", "cosmap", "flux2_shift")
SIZE_SHIFTS = ("flux_shift", "flux2_shift")  # shifted by the image's token count
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))  # where the mode density stays a density on [0, 1] (SD3 paper)


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


def fixed_shift(shift: float, sigmas: torch.Tensor) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): SD3's constant shift (diffusers' `shift`, SimpleTuner's
    `flow_schedule_shift`); s > 1 moves σ to the noisy end. The time shift with μ = ln s."""
    return time_shift(math.log(shift), sigmas)


def cosmap_sigmas(u: torch.Tensor) -> torch.Tensor:
    """SD3 paper's CosMap: σ = 1 − 1 / (tan(π·u/2) + 1) for u ~ U(0, 1); its density is the
    cosmap loss weighting, 2 / (π·(1 − 2σ + 2σ²))."""
    return 1.0 - 1.0 / (torch.tan(math.pi * u / 2) + 1.0)


def bell_weight(sigmas: torch.Tensor) -> torch.Tensor:
    """ai-toolkit's `timestep_type: weighted` loss weight: a bell over σ, exp(−2(σ − ½)²), lowered to 0
    at σ = 0 and 1 and scaled to mean 1 over uniform σ: mid-noise steps count most (up to 1.59×)."""
    floor = math.exp(-0.5)
    mean = math.sqrt(math.pi / 2) * math.erf(1 / math.sqrt(2)) - floor  # ∫₀¹ exp(−2(σ − ½)²) dσ − floor
    return (torch.exp(-2 * (sigmas.float() - 0.5) ** 2) - floor) / mean


@dataclass(frozen=True)
class TimestepSampling:
    """How training picks σ.

    uniform:      σ ~ U(0, 1).
    logit_normal: σ = sigmoid(n), n ~ N(logit_mean, logit_std) (SD3 / diffusers' default).
    flux_shift:   logit-normal, then FLUX's shift for the image's token count (kohya's
                  `flux_shift`, ai-toolkit's `timestep_type: flux_shift`): larger images train at
                  noisier σ, as they are sampled.
    flux2_shift:  musubi-tuner's name for the same on FLUX.2 (its `flux2_shift`): the token count
                  is the loaded family's (FLUX.2: one token per latent pixel), so on either family
                  it equals flux_shift; accepted so musubi's FLUX.2 settings read as they are.
    sigmoid:      σ = sigmoid(n), n ~ N(0, 1): ai-toolkit's `timestep_type: sigmoid`.
    weighted:     σ ~ U(0, 1) with the loss weighted by a bell over σ: ai-toolkit's `weighted`.
    mode:         SD3's mode sampling, mass at mid σ by `mode_scale` (diffusers' `mode`).
    cosmap:       SD3's CosMap density.
    `shift` ≠ 1 then applies SD3's fixed shift (every mode but the two that shift by size).
    """

    mode: str = "flux_shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # diffusers' default for `mode`
    shift: float = 1.0  # 1 = no fixed shift; 3.0 is SD3's, SimpleTuner's flow_schedule_shift

    def __post_init__(self):
        low, high = MODE_SCALE_RANGE
        checks = [
            (self.mode in TIMESTEP_SAMPLINGS,
             f"timestep_sampling is {self.mode!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}."),
            (self.logit_std > 0, f"logit_std is {self.logit_std}; it must be above 0 (1.0 is the usual value)."),
            (low <= self.mode_scale <= high,
             f"mode_scale is {self.mode_scale}; keep it between {low:g} and {high:.2f} (1.29 is diffusers' value)."),
            (self.shift > 0, f"shift is {self.shift}; use a value above 0 (1 = no shift, 3.0 is SD3's)."),
            (self.shift == 1 or self.mode not in SIZE_SHIFTS,
             f"shift is {self.shift} with timestep_sampling {self.mode}, which already shifts by image size; set "
             "shift to 1, or pick another timestep_sampling (sigmoid, logit_normal) to shift by a fixed value."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def sample(self, n: int, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
        if self.mode in ("logit_normal", "sigmoid", *SIZE_SHIFTS):
            mean, std = (0.0, 1.0) if self.mode == "sigmoid" else (self.logit_mean, self.logit_std)
            sigmas = compute_density_for_timestep_sampling("logit_normal", n, mean, std, generator=generator)
        elif self.mode == "mode":
            sigmas = compute_density_for_timestep_sampling("mode", n, mode_scale=self.mode_scale, generator=generator)
        else:
            sigmas = compute_density_for_timestep_sampling("uniform", n, generator=generator)
            if self.mode == "cosmap":
                sigmas = cosmap_sigmas(sigmas)
        if self.mode in SIZE_SHIFTS:
            return time_shift(flux_mu(image_seq_len), sigmas)
        return fixed_shift(self.shift, sigmas) if self.shift != 1 else sigmas

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the loss that this sampling implies (ai-toolkit's `weighted`), else 1."""
        return bell_weight(sigmas) if self.mode == "weighted" else torch.ones_like(sigmas, dtype=torch.float32)


def sampling_sigmas(steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """The σ schedule FLUX samples with: 1 → 0 in `steps` Euler steps, shifted like training."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    if not shift:
        return t
    sigmas = time_shift(flux_mu(image_seq_len), t[:-1])
    return torch.cat([sigmas, t[-1:]])
