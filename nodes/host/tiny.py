"""The embedded tiny FLUX as ComfyUI objects: MODEL, CLIP and VAE like Load Checkpoint's.

The transformer and VAE are the standalone library's tiny set (diffusers layout), loaded through
ComfyUI's own loaders exactly as a diffusers FLUX file would be. The text encoders are ComfyUI's
FLUX CLIP-L + T5 classes at toy widths with seeded weights, using ComfyUI's real tokenizers.
"""

from __future__ import annotations

from contextlib import contextmanager

import comfy.model_detection
import comfy.sd
import comfy.supported_models_base
import comfy.text_encoders.flux
import torch

from ...trainer.families.flux1 import tiny

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp8_e4m3fn": torch.float8_e4m3fn}

VAE_CONFIG = {"params": {"embed_dim": 16, "ddconfig": {
    "double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}

TEXT_ENCODER_SIZES = {
    "clip_l_model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 2},
    "t5xxl_model_config": {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_layers": 2, "num_heads": 2},
}


@contextmanager
def _widths_from_weights():
    """ComfyUI up to v0.3.x assumes FLUX.1's full widths (3072, 24 heads) when it detects a FLUX
    file; while loading the tiny one, read the widths from its weights instead."""
    detect = comfy.model_detection.detect_unet_config

    def detect_widths(state_dict, key_prefix, *args, **kwargs):
        config = detect(state_dict, key_prefix, *args, **kwargs)
        img_in = state_dict.get(f"{key_prefix}img_in.weight")
        if config and config.get("image_model") == "flux" and img_in is not None:
            config["hidden_size"] = img_in.shape[0]
            config["num_heads"] = img_in.shape[0] // sum(config["axes_dim"])
            config["context_in_dim"] = state_dict[f"{key_prefix}txt_in.weight"].shape[1]
        return config

    comfy.model_detection.detect_unet_config = detect_widths
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = detect


def load_tiny_flux(seed: int, weight_dtype: str = "default"):
    """(MODEL, CLIP, VAE) of the tiny FLUX for `seed`."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype is {weight_dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}.")
    parts = tiny.build(seed)
    options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES[weight_dtype] else {}
    with _widths_from_weights():
        weights = {k: v.clone() for k, v in parts.transformer.state_dict().items()}  # ComfyUI converts in place
        model = comfy.sd.load_diffusion_model_state_dict(weights, model_options=options)
    model.model.flux_dreambooth_name = parts.name

    vae = comfy.sd.VAE(sd=parts.vae.state_dict(), config=VAE_CONFIG)
    vae.latent_channels = 16

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                    comfy.text_encoders.flux.FluxClipModel)
    clip = comfy.sd.CLIP(target=target, model_options=dict(TEXT_ENCODER_SIZES))
    shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    missing, unexpected = clip.load_sd(tiny.seeded_weights(shapes, seed), full_model=True)
    if missing or unexpected:
        raise RuntimeError(f"Tiny FLUX text encoders did not load: missing {missing}, unexpected {unexpected}.")
    return model, clip, vae
