"""LoRAs on a MODEL exactly as the stock LoraLoader applies them, and LoRA files."""

from __future__ import annotations

import comfy.sd
import comfy.utils

from . import paths


def apply_lora(model, lora_sd: dict, strength: float):
    """What the stock LoraLoader does with a file, for a state dict."""
    return comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)[0]


def load_lora_file(name: str) -> dict:
    return comfy.utils.load_torch_file(str(paths.lora_file(name)), safe_load=True)
