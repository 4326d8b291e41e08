"""Chroma's layers: diffusers' `ChromaTransformer2DModel` names, where each lives in ComfyUI's BFL
layout, and the sizes read from the loaded model.

Chroma's blocks are FLUX.1's without their modulation Linears (`img_mod`, `txt_mod`,
`modulation`): the attention and MLP layers, and their fused BFL forms, are FLUX.1's, so the
names, slices and presets ("attention", "attention+mlp") mean the same rows in both families.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...lora.targets import LayerVocabulary
from ..flux1.layers import DOUBLE, SINGLE, FluxDims
from ..flux1.layers import VOCABULARY as FLUX1

MODULATION = {DOUBLE: ("norm1.linear", "norm1_context.linear"), SINGLE: ("norm.linear",)}

VOCABULARY = LayerVocabulary(
    groups=dict(FLUX1.groups),
    layers={group: {name: where for name, where in layers.items() if name not in MODULATION[group]}
            for group, layers in FLUX1.layers.items()},
    presets=FLUX1.presets,
)


@dataclass(frozen=True)
class ChromaDims:
    """The sizes of a loaded Chroma (defaults: Chroma1's, FLUX.1 schnell's), which a layer
    selection is checked and sliced against. Its own class (not FLUX.1's) so that a checkpoint
    records the family; the shapes and slices are FLUX.1's."""

    hidden_size: int = 3072
    mlp_hidden: int = 12288
    double_blocks: int = 19
    single_blocks: int = 38

    vocabulary = VOCABULARY
    depth = FluxDims.depth
    shape = FluxDims.shape
    rows = FluxDims.rows
