"""The tiny FLUX.2 written to disk as a ComfyUI user has FLUX.2 [klein]: the transformer in BFL's
layout (models/diffusion_models), Qwen3 as qwen_3_4b.safetensors (models/text_encoders, transformers'
keys under model.), and the VAE as flux2-vae.safetensors: the LDM layout plus its batch-norm
statistics (models/vae)."""

from __future__ import annotations

from pathlib import Path

import torch
from flux_files import vae_to_ldm
from safetensors.torch import save_file

from trainer.families.flux2 import bfl

TRANSFORMER_NAME = "flux-2-klein-tiny.safetensors"


def write_models_dir(parts, root: Path, dtype: torch.dtype = torch.float32) -> Path:
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    state = bfl.to_bfl(parts.transformer.state_dict())
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()},
              str(root / "diffusion_models" / TRANSFORMER_NAME))
    text = {f"model.{k}": v.contiguous() for k, v in parts.text_encoder.state_dict().items()}
    save_file(text, str(root / "text_encoders" / "qwen_3_4b.safetensors"))
    vae = parts.vae.state_dict()
    stats = {k: vae.pop(k) for k in list(vae) if k.startswith("bn.")}
    save_file({**vae_to_ldm(vae, len(parts.vae.config.block_out_channels)), **stats},
              str(root / "vae" / "flux2-vae.safetensors"))
    return root
