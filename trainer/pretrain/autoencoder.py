"""Stage 1 of the tiny FLUX's pretraining: the VAE learns to reconstruct the world.

The tiny `AutoencoderKL` (tiny.py) is trained as an ordinary VAE,

    loss = |x̂ − x|₁ + ‖x̂ − x‖² + β · KL(q(z|x) ‖ N(0, I)),    x̂ = decode(mean of q(z|x)),

on scenes of the synthetic world (world.py) and crops of the quickstart photos, so it can also
show a toy on a table. It is convolutional: trained on small crops, it encodes any size. Afterwards
its latents are rescaled to FLUX's normalisation (unit spread after `(z − shift) · scale`), so the
rest of the pipeline reads them as it reads a real FLUX VAE's.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import world

log = logging.getLogger(__name__)


@dataclass
class VaeSettings:
    steps: int = 600  # optimizer steps
    batch_size: int = 8
    size: int = 64  # side of the training crops, in pixels (the VAE is convolutional)
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6  # β: small, as in latent-diffusion VAEs; the latents only need to stay bounded
    # (decoded from the posterior's mean, not a sample: an autoencoder with a KL leash)
    photo_share: float = 0.25  # fraction of each batch cut from the quickstart photos


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), np.float32) / 255 for i in images])
                            ).permute(0, 3, 1, 2).contiguous()


def photo_crops(folder: Path, size: int, rng: random.Random, count: int, scale: int = 128) -> list[Image.Image]:
    """`count` random `size`² crops of the photos in `folder`, each first resized to `scale` on its
    short side (the quickstart trains at 128²)."""
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
    out = []
    for _ in range(count):
        photo = rng.choice(photos)
        k = scale / min(photo.size)
        photo = photo.resize((max(size, round(photo.width * k)), max(size, round(photo.height * k))))
        x, y = rng.randint(0, photo.width - size), rng.randint(0, photo.height - size)
        out.append(photo.crop((x, y, x + size, y + size)))
    return out


def batch(settings: VaeSettings, rng: random.Random, photos: Path | None) -> torch.Tensor:
    n_photos = round(settings.batch_size * settings.photo_share) if photos else 0
    scenes = [world.draw(world.random_scene(rng), settings.size, jitter=0.3, rng=rng)
              for _ in range(settings.batch_size - n_photos)]
    return to_pixels(scenes + (photo_crops(photos, settings.size, rng, n_photos) if n_photos else []))


def train_vae(vae: torch.nn.Module, settings: VaeSettings, seed: int, photos: Path | None = None,
              report=lambda step, loss: None) -> list[float]:
    """Train `vae` in place; returns the reconstruction loss per step."""
    rng = random.Random(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    losses = []
    for step in range(settings.steps):
        x = batch(settings, rng, photos) * 2 - 1
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.mode()).sample  # the mean: FLUX encodes with it, and it learns faster
        reconstruction = (x_hat - x).abs().mean() + (x_hat - x).square().mean()
        loss = reconstruction + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(reconstruction.item())
        report(step, losses[-1])
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def normalise(vae: torch.nn.Module, images: torch.Tensor, scale: float, shift: float) -> None:
    """Rescale the encoder's output so `(z − shift) · scale` has mean 0 and spread 1 on `images`
    ((B, 3, H, W) in [0, 1]), and the decoder's input by the inverse: decode(encode(x)) unchanged."""
    c = vae.config.latent_channels
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    k = 1.0 / (z.std().item() * scale)
    offset = shift - z.mean().item() * k  # after scaling by k, the mean lands on `shift`
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] = vae.quant_conv.bias[:c] * k + offset
    # decoder: post_quant_conv(z') with z' = k·z + offset must equal post_quant_conv(z)
    w = vae.post_quant_conv.weight
    vae.post_quant_conv.bias -= (w.sum(dim=(2, 3)) * (offset / k)).sum(dim=1)
    w /= k


@torch.no_grad()
def reconstruction_error(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean absolute pixel error of decode(encode(x)), x in [0, 1]."""
    x_hat = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample + 1) / 2
    return F.l1_loss(x_hat.clamp(0, 1), images).item()
