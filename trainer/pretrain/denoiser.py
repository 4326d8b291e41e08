"""Stage 2 of the tiny FLUX's pretraining: the transformer and its text encoders learn to draw the
world from its captions.

Rectified flow as in the LoRA loop (../loop/flow.py), here on every weight of the transformer
and of both tiny text encoders (CLIP-L's pooled vector and T5's tokens), on a fixed pool of
world scenes encoded once by the stage-1 VAE:

    z_σ = (1 − σ)·z + σ·ε,     loss = ‖v_θ(z_σ, σ, caption) − (ε − z)‖²

with σ logit-normal and FLUX's resolution shift, the same sampling the quickstart trains with.
The guidance input is fixed at the quickstart's 3.5: the tiny model is not guidance-distilled,
it simply always sees that value.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from ..families.conditioning import Conditioning
from ..families.flux1 import tiny
from ..loop import flow
from . import world
from .autoencoder import to_pixels

log = logging.getLogger(__name__)

GUIDANCE = 3.5


@dataclass
class DenoiserSettings:
    steps: int = 1500  # optimizer steps
    batch_size: int = 32
    size: int = 128  # pixels; the quickstart's resolution
    scenes: int = 2048  # the pool of encoded scenes
    learning_rate: float = 5e-4
    text_learning_rate: float = 2e-4  # the tiny CLIP and T5 train along, more gently


@torch.no_grad()
def scene_pool(model, settings: DenoiserSettings, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """`settings.scenes` jittered scenes as normalised latents, with their captions."""
    scenes = [world.random_scene(rng) for _ in range(settings.scenes)]
    latents = []
    for i in range(0, len(scenes), 64):
        images = [world.draw(s, settings.size, jitter=0.3, rng=rng) for s in scenes[i:i + 64]]
        latents.append(model.encode_images(to_pixels(images)))
    return torch.cat(latents), [s.caption for s in scenes]


def encode_batch(model, captions: list[str]) -> Conditioning:
    """Captions through the (training) text encoders, with grad, in one batch: the same values as
    `model.encode_text` per caption (every caption pads to the same length), a quarter of the time."""
    t5_ids = torch.stack([model.tokenizer(c, tiny.T5_TOKENS, bos=False) for c in captions])
    clip_ids = torch.stack([model.tokenizer(c, tiny.CLIP_TOKENS) for c in captions])
    return Conditioning(model.t5(t5_ids).last_hidden_state, model.clip(clip_ids).pooler_output, GUIDANCE)


def train_denoiser(model, settings: DenoiserSettings, seed: int, report=lambda step, loss: None) -> list[float]:
    """Train `model.transformer`, `model.clip` and `model.t5` (a tiny.TinyFlux) in place; returns
    the flow-matching loss per step."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    latents, captions = scene_pool(model, settings, rng)
    backend = model.backend()
    transformer, encoders = model.transformer, (model.clip, model.t5)
    for m in (transformer, *encoders):
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([
        {"params": list(transformer.parameters()), "lr": settings.learning_rate},
        {"params": [p for e in encoders for p in e.parameters()], "lr": settings.text_learning_rate}],
        weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    timesteps = flow.TimestepSampling("flux_shift")
    tokens = backend.family.tokens(*latents.shape[-2:])
    losses = []
    for step in range(settings.steps):
        rows = torch.randint(len(captions), (settings.batch_size,), generator=generator)
        z = latents[rows]
        noise = torch.randn(z.shape, generator=generator)
        sigmas = timesteps.sample(len(rows), tokens, generator)
        cond = encode_batch(model, [captions[i] for i in rows])
        v = backend.velocity(flow.noisy_latents(z, noise, sigmas), sigmas, cond)
        loss = flow.flow_matching_loss(v, flow.velocity_target(z, noise)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        report(step, losses[-1])
    for m in (transformer, *encoders):
        m.eval().requires_grad_(False)
    return losses
