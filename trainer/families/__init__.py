"""Model families: what differs between the FLUX models a user can load.

Each family is a folder (`flux1/`) holding its facts: the layer vocabulary and the sizes read
from the loaded model (`layers.py`), the training backends on ComfyUI's model and on diffusers'
(`comfy.py`, `diffusers.py`), and a tiny model for tests and demos (`tiny.py`). The generic core
(LoRA hooks, block runner, memory modes, the loop, checkpoints) knows none of them.
"""

from __future__ import annotations

from ..lora.targets import LayerVocabulary
from .flux1 import layers as flux1_layers

FAMILIES = {"flux1": flux1_layers.VOCABULARY}


def vocabularies() -> list[LayerVocabulary]:
    return list(FAMILIES.values())
