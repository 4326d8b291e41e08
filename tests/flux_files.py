"""The tiny FLUX written to disk as a ComfyUI user has FLUX.1: a BFL single-file transformer (as in
models/diffusion_models, bf16 or fp8), clip_l / t5xxl single files (models/text_encoders), the VAE as
ae.safetensors in its original (LDM) key layout (models/vae), and a diffusers folder."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.families.flux1 import bfl

RESNET = {"conv_shortcut": "nin_shortcut"}
ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL keys as BFL's ae.safetensors has them (the original LDM layout)."""
    out = {}
    for k, t in state.items():
        n = k.replace("conv_norm_out", "norm_out")
        n = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", n)
        n = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", n)
        n = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", n)
        n = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", n)
        if "mid_block.attentions.0." in n:
            n = n.replace("mid_block.attentions.0.", "mid.attn_1.")
            for d, ldm in ATTENTION.items():
                n = n.replace(f".{d}.", f".{ldm}.")
            if t.ndim == 2:
                t = t[:, :, None, None]  # LDM's attention projections are 1×1 convolutions
        for d, ldm in RESNET.items():
            n = n.replace(f".{d}.", f".{ldm}.")
        out[n] = t.contiguous()
    return out


def write_transformer_bfl(transformer, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    state = bfl.to_bfl(transformer.state_dict())
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return path


def write_vae(vae, path: Path) -> Path:
    save_file(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)), str(path))
    return path


def write_text_encoder(model, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A transformers text encoder's state dict as one file, as clip_l.safetensors / t5xxl_fp16 are."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; t5xxl files hold it once
    if "embeddings.token_embedding.weight" in state:  # transformers 5's CLIPTextModel: clip_l files say text_model.*
        state = {f"text_model.{k}": v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_models_dir(parts, root: Path, transformer_dtype: torch.dtype = torch.bfloat16,
                     transformer_name: str = "flux1-tiny.safetensors") -> Path:
    """A ComfyUI models folder: diffusion_models/, text_encoders/, vae/ (stock file names)."""
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_transformer_bfl(parts.transformer, root / "diffusion_models" / transformer_name, transformer_dtype)
    write_text_encoder(parts.clip, root / "text_encoders" / "clip_l.safetensors")
    write_text_encoder(parts.t5, root / "text_encoders" / "t5xxl_fp16.safetensors")
    write_vae(parts.vae, root / "vae" / "ae.safetensors")
    return root


def write_diffusers_folder(parts, folder: Path) -> Path:
    parts.transformer.save_pretrained(folder / "transformer")
    parts.vae.save_pretrained(folder / "vae")
    parts.clip.save_pretrained(folder / "text_encoder")
    parts.t5.save_pretrained(folder / "text_encoder_2")
    return folder
