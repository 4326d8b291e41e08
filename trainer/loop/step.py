"""One step's forward and backward: a batch's examples grouped by shape, noised, and the LoRA's
gradients accumulated (the loop in trainer.py calls it once per batch)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from ..data.encode import Example
from ..families.backend import FluxBackend
from ..families.conditioning import Conditioning
from ..lora.weights import LoraSet
from . import flow
from .batches import caption_texts, choose
from .config import TrainConfig
from .preservation import Preservation
from .text_phase import Embed


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that doesn't make the host wait for the device: from pinned memory, asynchronously
    (a live text embedding, which carries a gradient, is copied as it is)."""
    if device.type == "cuda" and not t.is_cuda and not t.requires_grad:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def step_loss(backend: FluxBackend, batch: list[Example], config: TrainConfig, generator: torch.Generator,
              scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
              preserve: Preservation | None = None, text: Embed | None = None, lora: LoraSet | None = None,
              share: range | None = None) -> torch.Tensor:
    """Forward and backward one batch; returns its mean loss, on the device (reading it is a
    sync). Gradients accumulate in the LoRA. With `preserve` (DOP), the subjects' class captions
    add their preservation term on the same noisy latents and σ (into `preserve.total`). With
    `text` (the text encoder's phase) the captions' embeddings are computed through it, with grad,
    instead of taken from the cache; DOP's class captions too, for the LoRA's side of its term (its
    frozen target keeps the cached, frozen encoder's embeddings). With `lora`,
    photos of a dataset with a network_weight other than 1 train with the LoRA at that multiplier.
    Examples whose tensors don't stack (another bucket, a longer caption) go in a pass of their own.
    `share` (several processes, distributed.py): the positions in `batch` this process trains; the
    random draws are those of the whole batch, and the loss is still divided by the whole batch."""
    groups: dict[tuple, list] = {}
    for position, e in enumerate(batch):
        latents, context, pooled, caption = choose(e, generator)
        mine = share is None or position in share
        if text is not None and mine:
            context, pooled = text(caption, context, pooled)
        version = caption_texts(e).index(caption) if preserve is not None and e.preserve else 0
        kept = e.preserve[version] if preserve is not None and e.preserve else None  # its class caption
        live = None  # the class caption through the trained text encoder, for the LoRA's side of DOP
        if kept is not None and text is not None and mine:
            live = text(e.preserved_captions[version], *kept)
        control = e.control_of(latents)  # an edit pair's source (Kontext), shaped as this view
        key = (tuple(latents.shape), context.shape[0], None if kept is None else kept[0].shape[0],
               None if control is None else tuple(control.shape), e.network_weight)
        groups.setdefault(key, []).append((latents, context, pooled, e.loss_weight, kept, live, mine, control))
    total = torch.zeros((), device=backend.device)
    for key, group in groups.items():
        shape = (len(group), *group[0][0].shape)
        noise = torch.randn(shape, generator=generator)  # drawn on the CPU: same on every device
        sigmas = config.timesteps.sample(len(group), backend.family.tokens(*shape[-2:]), generator)
        if share is not None:  # this process's part of the group
            rows = [i for i, g in enumerate(group) if g[6]]
            group, noise, sigmas = [group[i] for i in rows], noise[rows], sigmas[rows]
            if not group:
                continue
        latents = torch.stack([g[0] for g in group])
        cond = Conditioning.of([(g[1], g[2]) for g in group], config.guidance, references(group))
        cond = cond.to(backend.device, _to_device)
        weights = torch.tensor([g[3] for g in group])
        latents, noise, sigmas, weights = (_to_device(t, backend.device) for t in (latents, noise, sigmas, weights))
        noisy = flow.noisy_latents(latents, noise, sigmas)
        multiplier = key[-1]  # ai-toolkit's network_weight of these photos' dataset; backward recomputes blocks
        with lora.multiplied(multiplier) if lora is not None and multiplier != 1.0 else nullcontext():
            v_pred = backend.velocity(noisy, sigmas, cond)
            per_sample = (config.loss.per_sample(v_pred, flow.velocity_target(latents, noise), sigmas)
                          * config.timesteps.loss_weights(sigmas).to(v_pred.device))
            loss = (per_sample * weights).sum() / len(batch)
            scale(loss).backward()
        total += loss.detach()
        if group[0][4] is not None:  # DOP, with a backward of its own: the two graphs are never held at once
            kept = Conditioning.of([g[4] for g in group], config.guidance, references(group)).to(backend.device,
                                                                                                  _to_device)
            live = None if group[0][5] is None else \
                Conditioning.of([g[5] for g in group], config.guidance, references(group)).to(backend.device,
                                                                                               _to_device)
            preserve.backward(backend, noisy, sigmas, kept, len(batch), scale, live=live)
    return total


def references(group: list) -> tuple[torch.Tensor, ...]:
    """The group's edit sources (Kontext), stacked as one reference batch; () for plain photos."""
    return () if group[0][7] is None else (torch.stack([g[7] for g in group]),)
