"""FLUX.1's text encoders as transformers' models (CLIPTextModel, T5EncoderModel: the tiny FLUX's,
or a diffusers pipeline's text_encoder and text_encoder_2), as a TrainableText."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Collection

import torch
from torch import nn

from ...lora.text_encoder import CLIP_L, T5XXL

Tokenize = Callable[[str], torch.Tensor]  # caption -> token ids (L,)


class TransformersText:
    def __init__(self, clip: nn.Module, t5: nn.Module, clip_tokens: Tokenize, t5_tokens: Tokenize):
        self.clip, self.t5 = clip, t5
        self.clip_tokens, self.t5_tokens = clip_tokens, t5_tokens

    def encoders(self) -> dict[str, nn.Module]:
        return {CLIP_L: getattr(self.clip, "text_model", self.clip), T5XXL: self.t5}  # transformers 5 has no text_model

    def encode(self, caption: str, components: Collection[str] = (CLIP_L, T5XXL)):
        """(T5 tokens, CLIP pooled) as FLUX reads them; None for an encoder not in `components`."""
        context = pooled = None
        if T5XXL in components:
            ids = self.t5_tokens(caption)[None].to(next(self.t5.parameters()).device)
            context = self.t5(ids).last_hidden_state[0]
        if CLIP_L in components:
            ids = self.clip_tokens(caption)[None].to(next(self.clip.parameters()).device)
            pooled = self.clip(ids).pooler_output[0]
        return context, pooled

    @contextmanager
    def ready(self, trained: Collection[str]):
        yield  # in memory where they are, plain tensors, and out-of-place residuals: nothing to do
