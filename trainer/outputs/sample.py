"""A plain Euler sampler for the standalone library (ComfyUI samples with its own KSampler)."""

from __future__ import annotations

import torch

from ..families.backend import FluxBackend
from ..families.conditioning import Conditioning
from ..loop import flow


@torch.no_grad()
def sample(backend: FluxBackend, cond: Conditioning, height: int, width: int, steps: int = 20,
           seed: int = 0) -> torch.Tensor:
    """Latents (1, C, height, width) for one prompt (`cond`, a batch of one, with its guidance):
    integrate dz/dσ = v from σ=1 to 0, with the family's latent channels and token count."""
    generator = torch.Generator().manual_seed(seed)
    family = backend.family
    z = torch.randn(1, family.latent_channels, height, width, generator=generator).to(backend.device)
    sigmas = flow.sampling_sigmas(steps, family.tokens(height, width))
    cond = cond.to(backend.device)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = backend.velocity(z, sigma.expand(1), cond)
        z = z + (sigma_next - sigma) * v
    return z
