"""ComfyUI's FLUX CLIP (its FluxClipModel: `clip_l` and `t5xxl`) as text encoders a run trains.

Like comfy.py, nothing here imports ComfyUI: the CLIP object is used through its attributes, and
loading it onto its device is the host's (`load`, which loads it together with the transformer so
that neither pushes the other off)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Collection

import torch
from torch import nn

from ...loop.blocks import protect_stream
from ...lora.text_encoder import CLIP_L, T5XXL
from .comfy import usable_by_autograd


class ComfyText:
    def __init__(self, clip, load: Callable[[], None]):
        self.clip, self.load = clip, load
        self.model = clip.cond_stage_model
        self._tokens: dict[str, dict] = {}

    @property
    def device(self) -> torch.device:
        return torch.device(self.clip.patcher.load_device)

    def encoders(self) -> dict[str, nn.Module]:
        found = {}
        if hasattr(self.model, "clip_l"):
            found[CLIP_L] = self.model.clip_l.transformer.text_model
        if hasattr(self.model, "t5xxl"):
            found[T5XXL] = self.model.t5xxl.transformer
        return found

    def _streams(self, trained: Collection[str]) -> list[nn.Module]:
        """The layers that add to their residual stream in place (`x += …` in CLIPLayer and T5's sub-layers)."""
        layers = []
        if CLIP_L in trained:
            layers += list(self.model.clip_l.transformer.text_model.encoder.layers)
        if T5XXL in trained:
            layers += list(self.model.t5xxl.transformer.encoder.block)
        return layers

    def encode(self, caption: str, components: Collection[str]):
        """As CLIPTextEncode encodes `caption` (CLIP-L's pooled vector, T5's tokens), with grad."""
        if caption not in self._tokens:
            self._tokens[caption] = self.clip.tokenize(caption)
        tokens, model = self._tokens[caption], self.model
        model.reset_clip_options()
        if self.clip.layer_idx is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        model.set_clip_options({"execution_device": self.device})
        context = pooled = None
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            if T5XXL in components:
                context = model.t5xxl.encode_token_weights(tokens["t5xxl"])[0][0]
            if CLIP_L in components:
                pooled = model.clip_l.encode_token_weights(tokens["l"])[1][0]
        return context, pooled

    @contextmanager
    def ready(self, trained: Collection[str]):
        self.load()
        encoders = self.encoders()
        for component in trained:
            usable_by_autograd(encoders[component])
        with ExitStack() as stack:
            for layer in self._streams(trained):
                stack.enter_context(_stream_protected(layer))
            yield


@contextmanager
def _stream_protected(layer: nn.Module):
    """While inside, `layer` runs with what autograd saves of its input stream cloned (blocks.py's
    protect_stream), so its in-place adds can't change what backward reads."""
    had = layer.__dict__.get("forward")
    forward = layer.forward

    def protected(x, *args, **kwargs):
        with protect_stream([x]):
            return forward(x, *args, **kwargs)

    layer.forward = protected
    try:
        yield
    finally:
        if had is None:
            del layer.forward
        else:
            layer.forward = had
