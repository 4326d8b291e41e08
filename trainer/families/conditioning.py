"""What the transformer is conditioned on besides the noisy latents and σ, as one value.

Families read different fields: FLUX.1 the text tokens and the pooled CLIP vector, FLUX.2 the
text tokens only, both the guidance strength when their weights have a guidance embedding.
`references` holds clean reference latents (an edit's source image) for the families that take
them in (Kontext, FLUX.2): a backend that reads none refuses them instead of ignoring them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

Text = tuple[torch.Tensor, "torch.Tensor | None"]  # one caption's (context (L, D), pooled (D,) or None)


@dataclass(frozen=True)
class Conditioning:
    """A batch's conditioning: every tensor has the batch first."""

    context: torch.Tensor  # text tokens (B, L, D)
    pooled: torch.Tensor | None = None  # FLUX.1's CLIP vector (B, D); None for families without one
    guidance: float = 1.0  # the distilled guidance strength, read by models with a guidance embedding
    references: tuple[torch.Tensor, ...] = ()  # clean reference latents (B, C, h, w), unnoised

    @classmethod
    def of(cls, texts: list[Text], guidance: float = 1.0, references: tuple[torch.Tensor, ...] = ()
           ) -> "Conditioning":
        """A batch from captions' (context, pooled) pairs, as the encode cache holds them."""
        context = torch.stack([c for c, _ in texts])
        pooled = None if texts[0][1] is None else torch.stack([p for _, p in texts])
        return cls(context, pooled, guidance, tuple(references))

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def to(self, device: torch.device, move=None) -> "Conditioning":
        """On `device`; `move(t, device)` copies each tensor (default: `t.to(device)`)."""
        move = move or (lambda t, d: t.to(d))
        return replace(self, context=move(self.context, device),
                       pooled=None if self.pooled is None else move(self.pooled, device),
                       references=tuple(move(r, device) for r in self.references))
