"""What a step trains on: batches drawn epoch by epoch, and for each example its view of the
image and version of its caption (the caption, a tag shuffle, or the trigger-only dropout one)."""

from __future__ import annotations

import torch

from ..data.encode import Example


class EpochSampler:
    """Batches of example indices: each epoch a fresh seeded shuffle, every example `weights[i]`
    times. A batch holds examples of one bucket (shape) only, so it stacks into one forward."""

    def __init__(self, weights: list[int], batch_size: int, generator: torch.Generator,
                 buckets: list[tuple] | None = None):
        self.pool = [i for i, n in enumerate(weights) for _ in range(n)]
        self.buckets = buckets or [()] * len(weights)
        self.batch_size, self.generator, self.queue = batch_size, generator, []

    def next_batch(self) -> list[int]:
        if not self.queue:
            order = [self.pool[i] for i in torch.randperm(len(self.pool), generator=self.generator).tolist()]
            by_bucket: dict[tuple, list[int]] = {}
            for i in order:
                by_bucket.setdefault(self.buckets[i], []).append(i)
            batches = [ids[k:k + self.batch_size] for ids in by_bucket.values()
                       for k in range(0, len(ids), self.batch_size)]
            if len(by_bucket) > 1:  # interleave the buckets
                batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
            self.queue = batches
        return self.queue.pop(0)


def caption_versions(e: Example) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The versions of an example's caption: itself, its tag shuffles, the trigger-only dropout one."""
    return [(e.context, e.pooled), *e.texts] + ([e.dropout_text] if e.dropout_text is not None else [])


def caption_texts(e: Example) -> list[str]:
    """The captions `caption_versions` encode, in the same order (a trained text encoder encodes them live)."""
    return [e.caption, *e.shuffled_captions] + ([e.dropout_caption] if e.dropout_text is not None else [])


def pick(e: Example, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """This step's view of the image and which version of its caption (`caption_versions`; dropped to
    the trigger word with probability dropout_rate). Draws from the generator only when there is a choice."""
    latents = e.latents
    if e.views:
        latents = ([e.latents] + e.views)[int(torch.randint(len(e.views) + 1, (1,), generator=generator))]
    if e.dropout_text is not None and float(torch.rand(1, generator=generator)) < e.dropout_rate:
        return latents, len(e.texts) + 1
    if e.texts:
        return latents, int(torch.randint(len(e.texts) + 1, (1,), generator=generator))
    return latents, 0


def choose(e: Example, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """This step's view of the image and version of its caption: latents, cached embeddings and
    the caption they encode."""
    latents, version = pick(e, generator)
    return latents, *caption_versions(e)[version], caption_texts(e)[version]
