"""LoRAs on a MODEL exactly as the stock LoraLoader applies them, and LoRA files."""

from __future__ import annotations

import comfy.sd
import comfy.utils

from ...trainer.log import logger
from ...trainer.lora import text_encoder
from . import paths

log = logger(__name__)


def apply_lora(model, lora_sd: dict, strength: float):
    """What the stock LoraLoader does with a file, for a state dict, on the MODEL only: a text-encoder
    part (lora_te*) is for the CLIP (apply_lora_to_clip), and left out here rather than reported unloaded."""
    transformer, text = text_encoder.split_keys(lora_sd)
    if text:
        log.info("The LoRA's text-encoder part (%d keys) is not applied to the MODEL; it goes on the CLIP "
                 "(the Train node's clip output, or the stock Load LoRA node).", len(text))
    return comfy.sd.load_lora_for_models(model, None, transformer, strength, 0)[0]


def apply_lora_to_clip(clip, lora_sd: dict, strength: float):
    """The CLIP with the LoRA's text-encoder part applied, as the stock LoraLoader applies it."""
    return comfy.sd.load_lora_for_models(None, clip, text_encoder.split_keys(lora_sd)[1], 0, strength)[1]


def load_lora_file(name: str) -> dict:
    return comfy.utils.load_torch_file(str(paths.lora_file(name)), safe_load=True)
