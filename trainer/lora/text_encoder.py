"""LoRA on FLUX's text encoders, computed on activations like the transformer's (weights.py).

FLUX reads two encoders: CLIP-L, whose pooled vector conditions every block, and T5-XXL, whose
tokens the transformer attends to. diffusers' train_dreambooth_lora_flux.py trains CLIP-L only
(`--train_text_encoder`); kohya's sd-scripts can add T5. Each encoder is a component of the run's
LoraSet ('clip_l', 't5xxl'), its targets named by transformers' module paths, which ComfyUI's
CLIP-L and T5 classes use too (`text_model.encoder.layers.3.self_attn.q_proj`,
`encoder.block.3.layer.0.SelfAttention.q`).

A host that can train its encoders offers a `TrainableText`: a caption in, its embeddings out,
computed with grad through whatever LoRA is attached.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Collection, ContextManager, Protocol

import torch
from torch import nn

from .targets import LoraTarget
from .weights import LoraSet, LoraWeight, attach, detach_all

CLIP_L, T5XXL = "clip_l", "t5xxl"
TEXT_COMPONENTS = (CLIP_L, T5XXL)
# the Linear layers of each encoder that get a LoRA (attention and MLP of every layer), by their
# path in the module TrainableText.encoders() gives, and the prefix that makes it the checkpoint name
LAYERS = {
    CLIP_L: re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"),
    T5XXL: re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))"),
}
ROOTS = {CLIP_L: "text_model.", T5XXL: ""}  # CLIP-L's layers are text_model.encoder.layers.* in its files
# kohya sd-scripts' lora_flux.py names (ComfyUI's model_lora_keys_clip reads them for FLUX; T5 also as lora_te2)
KOHYA_PREFIXES = {CLIP_L: "lora_te1_", T5XXL: "lora_te3_"}
# diffusers' FluxLoraLoaderMixin loads `transformer` and `text_encoder` (CLIP-L) only
DIFFUSERS_PREFIXES = {CLIP_L: "text_encoder."}
NAMES = {CLIP_L: "CLIP-L", T5XXL: "T5-XXL"}


class TrainableText(Protocol):
    """Text encoders a run can train (ComfyUI's CLIP, or transformers' models)."""

    def encoders(self) -> dict[str, nn.Module]:
        """Each component's module, from which the LAYERS paths are read: for 'clip_l' the CLIP text
        transformer (with `.encoder.layers`), for 't5xxl' the T5 encoder model (with `.encoder.block`)."""

    def encode(self, caption: str, components: Collection[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """caption -> (T5 tokens (L, D) when 't5xxl' is in `components`, else None; CLIP pooled (D,)
        when 'clip_l' is, else None), with grad through any LoRA attached to the encoders."""

    def ready(self, trained: Collection[str]) -> ContextManager[None]:
        """Inside, the encoders are on their device and the `trained` ones usable by autograd
        (entered per training segment)."""


def components(t5: bool) -> tuple[str, ...]:
    """The encoders trained: CLIP-L (as diffusers does), and T5-XXL with `text_encoder_t5`."""
    return (CLIP_L, T5XXL) if t5 else (CLIP_L,)


def path_of(target: LoraTarget) -> str:
    """A text-encoder target's name inside its encoder's files ('text_model.encoder.layers.0.mlp.fc1')."""
    return target.name.split(".", 1)[1]


def module_path(target: LoraTarget) -> str:
    """Where a text-encoder target lives in the module TrainableText.encoders() gives."""
    return path_of(target).removeprefix(ROOTS[target.component])


def targets(text: TrainableText, trained: Collection[str], rank: int, alpha: float | None = None
            ) -> list[LoraTarget]:
    """A LoRA of `rank` (scale alpha/rank; alpha defaults to the rank) on the attention and MLP
    layers of each encoder in `trained`, in the order of the model's layers."""
    encoders, found = text.encoders(), []
    scale = (alpha if alpha else rank) / rank
    for component in trained:
        module = encoders.get(component)
        if module is None:
            raise ValueError(f"This CLIP has no {NAMES[component]} to train; it has {', '.join(encoders) or 'none'}. "
                             "Turn text_encoder_t5 off, or load FLUX's CLIP-L and T5 (DualCLIPLoader, type flux).")
        layers = [(path, layer) for path, layer in module.named_modules()
                  if LAYERS[component].fullmatch(path) and isinstance(layer, nn.Linear)]
        if not layers:
            raise ValueError(f"The {NAMES[component]} text encoder has none of the layers a LoRA trains "
                             f"({LAYERS[component].pattern}); it is not the encoder FLUX.1 uses.")
        for path, layer in layers:
            most = min(layer.in_features, layer.out_features)
            if rank > most:
                raise ValueError(f"text_encoder_rank is {rank} for {NAMES[component]}'s {path}, a "
                                 f"{layer.in_features}→{layer.out_features} layer: a rank above {most} adds "
                                 "nothing. Lower text_encoder_rank (4–32 is usual), or 0 for the transformer's.")
            name = f"{component}.{ROOTS[component]}{path}"
            found.append(LoraTarget(name, name, None, rank, scale, layer.in_features, layer.out_features,
                                    (0, layer.out_features), component=component))
    return found


def layer_finder(text: TrainableText) -> Callable[[LoraWeight], nn.Module]:
    encoders = text.encoders()
    return lambda w: encoders[w.target.component].get_submodule(module_path(w.target))


@contextmanager
def applied(text: TrainableText, lora: LoraSet):
    """While inside, the encoders are ready and compute with `lora`'s text-encoder weights."""
    part = lora.part(*TEXT_COMPONENTS)
    with text.ready(part.components()):
        handles = attach(part, layer_finder(text), split=True)
        try:
            yield
        finally:
            detach_all(handles)


def has_delta(lora: LoraSet) -> bool:
    """Whether the text-encoder weights change anything yet (their up matrices start at zero and
    stay so until the text encoder's phase begins)."""
    return any(bool(w.up.detach().any()) for w in lora.part(*TEXT_COMPONENTS))


def kohya_key(component: str, module: str) -> str:
    """The kohya name of a module: lora_unet_double_blocks_0_img_attn_qkv, lora_te1_text_model_…"""
    if component in KOHYA_PREFIXES:
        return KOHYA_PREFIXES[component] + module.split(".", 1)[1].replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


def split_keys(sd: dict) -> tuple[dict, dict]:
    """A LoRA file's keys as (the transformer's, the text encoders': kohya's lora_te*, diffusers' text_encoder*)."""
    text = {k: v for k, v in sd.items() if k.startswith(("lora_te", "text_encoder"))}
    return {k: v for k, v in sd.items() if k not in text}, text
