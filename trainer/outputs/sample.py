"""A plain Euler sampler for the standalone library (ComfyUI samples with its own KSampler)."""

from __future__ import annotations

import torch

from ..families.backend import FluxBackend
from ..loop import flow


@torch.no_grad()
def sample(backend: FluxBackend, context: torch.Tensor, pooled: torch.Tensor, height: int, width: int,
           steps: int = 20, guidance: float = 3.5, seed: int = 0, channels: int = 16) -> torch.Tensor:
    """Latents (1, C, height, width) for one prompt: integrate dz/dσ = v from σ=1 to 0."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(1, channels, height, width, generator=generator).to(backend.device)
    sigmas = flow.sampling_sigmas(steps, flow.image_seq_len(height, width))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = backend.velocity(z, sigma.expand(1), context[None], pooled[None], guidance)
        z = z + (sigma_next - sigma) * v
    return z
