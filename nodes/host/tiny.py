"""The embedded tiny FLUX models as ComfyUI objects: MODEL, CLIP and VAE like Load Checkpoint's.

FLUX.1: the transformer and VAE are the standalone library's tiny set (diffusers layout), loaded
through ComfyUI's own loaders exactly as a diffusers FLUX file would be; the text encoders are
ComfyUI's FLUX CLIP-L + T5 classes at toy widths with seeded weights, using ComfyUI's real
tokenizers. FLUX.2: ComfyUI's own classes throughout, at toy widths with seeded weights — the
transformer through its FLUX.2 detection, FLUX.2 [klein]'s Qwen3 text encoder with the Qwen
tokenizer ComfyUI ships, and FLUX.2's VAE (batch-normalised 2×2 patches, 128 channels at 1/16).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import comfy.model_base
import comfy.model_detection
import comfy.ops
import comfy.sd
import comfy.supported_models_base
import comfy.text_encoders.flux
import torch

from ...trainer.families import flux2
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
    file, and every ComfyUI Chroma1's (3072, a 5-layer 5120-wide guidance MLP) for a Chroma file;
    while loading a tiny one, read the widths from its weights instead."""
    detect = comfy.model_detection.detect_unet_config

    def detect_widths(state_dict, key_prefix, *args, **kwargs):
        config = detect(state_dict, key_prefix, *args, **kwargs)
        img_in = state_dict.get(f"{key_prefix}img_in.weight")
        if config and config.get("image_model") in ("flux", "chroma") and img_in is not None:
            config["hidden_size"] = img_in.shape[0]
            config["num_heads"] = img_in.shape[0] // sum(config["axes_dim"])
            config["context_in_dim"] = state_dict[f"{key_prefix}txt_in.weight"].shape[1]
        if config and config.get("image_model") == "chroma":  # the distilled guidance layer's widths too
            approximator = f"{key_prefix}distilled_guidance_layer."
            config["hidden_dim"] = state_dict[f"{approximator}in_proj.weight"].shape[0]
            config["out_dim"] = state_dict[f"{approximator}out_proj.weight"].shape[0]
            config["n_layers"] = 1 + max(int(k[len(approximator):].split(".")[1]) for k in state_dict
                                         if k.startswith(f"{approximator}layers."))
        return config

    comfy.model_detection.detect_unet_config = detect_widths
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = detect


def load_tiny_flux(seed: int, weight_dtype: str = "default", kontext: bool = False):
    """(MODEL, CLIP, VAE) of the tiny FLUX for `seed`; with `kontext`, named as the tiny FLUX.1
    Kontext [dev] (the same architecture: what makes it an edit model is training on pairs)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype is {weight_dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}.")
    parts = tiny.build(seed)
    options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES[weight_dtype] else {}
    with _widths_from_weights():
        weights = {k: v.clone() for k, v in parts.transformer.state_dict().items()}  # ComfyUI converts in place
        model = comfy.sd.load_diffusion_model_state_dict(weights, model_options=options)
    model.model.flux_dreambooth_name = parts.name.replace("tiny-flux", "tiny-flux1-kontext") if kontext else parts.name

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


# A FLUX.2 at toy width: the real block structure (shared modulation, SwiGLU, no biases, 4-axis RoPE,
# 128 latent channels in 1×1 patches), 2 heads of 128 as ComfyUI's detection reads from the weights.
# [klein]'s text encoder, ComfyUI's Qwen3-4B class, at toy width: it concatenates layers 9, 18 and 27
# (so 28 layers), each attention head 128 wide as Qwen3's are.
TINY_QWEN3 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 28, "num_attention_heads": 1,
              "num_key_value_heads": 1}
TINY_FLUX2 = {"in_channels": 128, "out_channels": 128, "vec_in_dim": None,
              "context_in_dim": 3 * TINY_QWEN3["hidden_size"],
              "hidden_size": 256, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
              "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1, "qkv_bias": False,
              "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
              "default_ref_method": "index", "ref_index_scale": 10.0}


def _comfyui_version() -> str:
    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "older"
    return version


def check_flux2() -> None:
    """FLUX.2 needs a ComfyUI that has it (model_base.Flux2): else an error naming the version."""
    if not hasattr(comfy.model_base, "Flux2"):
        version = _comfyui_version()
        raise ValueError(f"FLUX.2 needs ComfyUI ≥ {flux2.MIN_COMFYUI} (FLUX.2 [klein]: ≥ {flux2.MIN_COMFYUI_KLEIN}); "
                         f"this ComfyUI is {version}. Update ComfyUI to train FLUX.2, or pick FLUX.1.")


def tiny_flux2_weights(seed: int, guidance: bool = False) -> dict[str, torch.Tensor]:
    """Seeded weights of the toy FLUX.2 in BFL names, as a FLUX.2 file holds them (with a
    guidance embedding, [dev]'s layout; without, [klein]'s)."""
    from comfy.ldm.flux.model import Flux

    with torch.device("meta"):
        dit = Flux(operations=comfy.ops.disable_weight_init, guidance_embed=guidance, **TINY_FLUX2)
    return tiny.seeded_weights({k: tuple(v.shape) for k, v in dit.state_dict().items()}, seed)


def load_tiny_flux2(seed: int, guidance: bool = False, weight_dtype: str = "default"):
    """The toy FLUX.2 as a MODEL, loaded by ComfyUI's own loader (its detection, model_base.Flux2)."""
    check_flux2()
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype is {weight_dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}.")
    options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES[weight_dtype] else {}
    model = comfy.sd.load_diffusion_model_state_dict(tiny_flux2_weights(seed, guidance), model_options=options)
    model.model.flux_dreambooth_name = f"tiny-flux2 {'dev' if guidance else 'klein'} (random weights, seed {seed})"
    return model


# A Chroma at toy width: FLUX.1's blocks without modulation layers, 2 heads of 128, a 2-layer
# distilled guidance MLP 64 wide (Chroma1's: 5 layers, 5120 wide).
TINY_CHROMA = {"in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 256, "mlp_ratio": 4.0,
               "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 10000,
               "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 256, "hidden_dim": 64, "n_layers": 2,
               "txt_ids_dims": [], "vec_in_dim": None}


def tiny_chroma_weights(seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights of the toy Chroma in BFL names, as a Chroma file holds them (RMSNorm
    scales as `.scale`, which every ComfyUI's Chroma detection reads)."""
    import dataclasses

    from comfy.ldm.chroma.model import Chroma, ChromaParams

    fields = {f.name for f in dataclasses.fields(ChromaParams)}  # v0.3.64's has no txt_ids_dims / vec_in_dim
    with torch.device("meta"):
        dit = Chroma(operations=comfy.ops.disable_weight_init, **{k: v for k, v in TINY_CHROMA.items() if k in fields})
    weights = tiny.seeded_weights({k: tuple(v.shape) for k, v in dit.state_dict().items()}, seed)
    return {re.sub(r"(query_norm|key_norm|norms\.\d+)\.weight$", r"\1.scale", k): v for k, v in weights.items()}


def load_tiny_chroma(seed: int, weight_dtype: str = "default"):
    """The toy Chroma as a MODEL, loaded by ComfyUI's own loader (its detection, model_base.Chroma)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype is {weight_dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}.")
    options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES[weight_dtype] else {}
    with _widths_from_weights():
        model = comfy.sd.load_diffusion_model_state_dict(tiny_chroma_weights(seed), model_options=options)
    model.model.flux_dreambooth_name = f"tiny-chroma (random weights, seed {seed})"
    return model


# FLUX.2's VAE as ComfyUI builds it (a KL autoencoder whose 32 latent channels are batch-normalised
# in 2×2 patches: 128 channels at 1/16 of the image), at toy width.
TINY_FLUX2_VAE = {"params": {"embed_dim": 32, "ddconfig": {
    "double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "batch_norm_latent": True}}}


def tiny_flux2_clip(seed: int):
    """FLUX.2 [klein]'s text encoder as a CLIP: ComfyUI's Klein tokenizer (its Qwen files) and Qwen3 class."""
    import comfy.text_encoders.flux as te

    if not hasattr(te, "klein_te"):
        raise ValueError(f"The tiny FLUX.2 is a [klein], whose Qwen3 text encoder needs ComfyUI ≥ "
                         f"{flux2.MIN_COMFYUI_KLEIN}; this ComfyUI is {_comfyui_version()}. Update ComfyUI, or pick "
                         "FLUX.1.")
    target = comfy.supported_models_base.ClipTarget(te.KleinTokenizer, te.klein_te())
    clip = comfy.sd.CLIP(target=target, model_options={"qwen3_4b_model_config": dict(TINY_QWEN3)})
    shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    missing, unexpected = clip.load_sd(tiny.seeded_weights(shapes, seed), full_model=True)
    if missing or unexpected:
        raise RuntimeError(f"Tiny FLUX.2 text encoder did not load: missing {missing}, unexpected {unexpected}.")
    return clip


def tiny_flux2_vae(seed: int):
    """FLUX.2's VAE class at toy width; its latent batch norm starts as the identity (mean 0, variance 1)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoencoderKL(**TINY_FLUX2_VAE["params"]).state_dict().items()}
    weights = tiny.seeded_weights(shapes, seed)
    channels = shapes["bn.running_mean"][0]
    weights.update({"bn.running_mean": torch.zeros(channels), "bn.running_var": torch.ones(channels),
                    "bn.num_batches_tracked": torch.tensor(0)})
    vae = comfy.sd.VAE(sd=weights, config=TINY_FLUX2_VAE)
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = channels, 16, 16  # as ComfyUI sets them
    return vae


def load_tiny_flux2_set(seed: int, weight_dtype: str = "default"):
    """(MODEL, CLIP, VAE) of the tiny FLUX.2 [klein] for `seed`."""
    return load_tiny_flux2(seed, weight_dtype=weight_dtype), tiny_flux2_clip(seed), tiny_flux2_vae(seed)


# The Tiny FLUX node's `family` choices: label -> (seed, weight_dtype) -> (MODEL, CLIP, VAE)
TINY_FAMILIES = {
    "FLUX.1": load_tiny_flux,
    "FLUX.1 Kontext": lambda seed, weight_dtype="default": load_tiny_flux(seed, weight_dtype, kontext=True),
    "FLUX.2": load_tiny_flux2_set,
}
