"""Model families: what differs between the FLUX models a user can load.

Each family is a folder (`flux1/`) holding its facts: its `Family` (spec.py: layer vocabulary,
dims class, latent format, timestep sampling, conditioning fields, export names) in its
`__init__.py`, the layer vocabulary and the sizes read from the loaded model (`layers.py`), the
training backends on ComfyUI's model and on diffusers' (`comfy.py`, `diffusers.py`), and a tiny
model for tests and demos (`tiny.py`). The generic core (LoRA hooks, block runner, memory modes,
the loop, checkpoints) knows none of them. A new family is a new folder and one line below.
"""

from __future__ import annotations

from ..lora.targets import LayerVocabulary
from . import chroma, flux1, flux2
from .spec import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (flux1.FAMILY, flux2.FAMILY, chroma.FAMILY)}


def family(name: str) -> Family:
    """The family recorded as `name` (a checkpoint's, a LoRA file's): a clear error if unknown."""
    if name not in FAMILIES:
        raise ValueError(f"The model family {name!r} is not one this version trains; it knows "
                         f"{', '.join(FAMILIES)}. Update the node pack, or use a file trained on one of those.")
    return FAMILIES[name]


def of_layout(dims) -> Family:
    """The family whose dims class `dims` is (a backend's `dims`)."""
    for f in FAMILIES.values():
        if isinstance(dims, f.layout):
            return f
    raise TypeError(f"{type(dims).__name__} is no registered family's layout.")


def vocabularies() -> list[LayerVocabulary]:
    return [f.vocabulary for f in FAMILIES.values()]
