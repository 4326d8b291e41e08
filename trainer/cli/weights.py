"""What a weights file on disk holds, read from its safetensors header alone (no tensor is loaded):
the check that `--model`, `--clip-l`, `--t5` and `--vae` each got the file they expect, before
anything is loaded or written."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..families.flux1.bfl import strip_prefix
from ..recipe.fields import RecipeError

TRANSFORMER, CLIP_L, T5, VAE = "transformer", "clip_l", "t5", "vae"
FLUX2, QWEN3, FLUX2_VAE = "flux2_transformer", "qwen3", "flux2_vae"  # FLUX.2 [klein]'s three files
EXPECTED = {
    TRANSFORMER: "a FLUX.1 transformer (BFL keys double_blocks.* / single_blocks.*, as in models/diffusion_models; "
                 "or diffusers' transformer_blocks.*)",
    CLIP_L: "a CLIP-L text encoder (keys text_model.*, as clip_l.safetensors in models/text_encoders)",
    T5: "a T5-XXL encoder (keys encoder.block.*, as t5xxl_fp16.safetensors in models/text_encoders)",
    VAE: "FLUX.1's VAE (16 latent channels, keys encoder.* / decoder.*, as ae.safetensors in models/vae)",
    FLUX2: "a FLUX.2 transformer (BFL keys double_stream_modulation_img.lin.* and double_blocks.*, as "
           "flux-2-klein-4b.safetensors in models/diffusion_models)",
    QWEN3: "FLUX.2 [klein]'s Qwen3 text encoder (keys model.layers.*.self_attn.q_norm.*, as qwen_3_4b.safetensors "
           "in models/text_encoders)",
    FLUX2_VAE: "FLUX.2's VAE (32 latent channels and bn.running_mean, as flux2-vae.safetensors in models/vae)",
}
MODEL_KINDS = {TRANSFORMER: "flux1", FLUX2: "flux2"}  # a transformer file's kind -> its family


@dataclass(frozen=True)
class Weights:
    """A safetensors file's tensor names, shapes and dtypes, and what it is."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    kind: str  # one of the four above, or a description of something else

    @property
    def dtype(self) -> str:
        """The dtype most of its tensors have (F8_E4M3 for an fp8 file)."""
        counts: dict[str, int] = {}
        for d in self.dtypes.values():
            counts[d] = counts.get(d, 0) + 1
        return max(counts, key=counts.get) if counts else "?"


def read_header(path: Path) -> dict:
    import json

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError("not a safetensors file")
        return json.loads(f.read(size))


def kind_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """TRANSFORMER / CLIP_L / T5 / VAE, or what else the keys say the file is."""
    keys = set(shapes)
    bfl = strip_prefix(shapes)
    if "double_stream_modulation_img.lin.weight" in bfl:
        return FLUX2 if bfl["img_in.weight"][1] == 128 else "a FLUX.2 transformer with another input width"
    if "double_stream_modulation_img.linear.weight" in keys and "x_embedder.weight" in keys:
        return FLUX2
    if any(k.startswith("distilled_guidance_layer.") for k in bfl):
        return ("a Chroma transformer (the command line trains FLUX.1 and FLUX.2; train Chroma in ComfyUI: Load "
                "Diffusion Model, then the Train node, which reads the family from the loaded model)")
    if "img_in.weight" in bfl and "double_blocks.0.img_attn.qkv.weight" in bfl:
        channels = bfl["img_in.weight"][1]
        return TRANSFORMER if channels == 64 else \
            f"a FLUX.1 transformer with {channels // 4}-channel input (Fill / Depth / Canny models can't be trained)"
    if "x_embedder.weight" in keys and "transformer_blocks.0.attn.to_q.weight" in keys:
        return TRANSFORMER
    if any(".lora_" in k or k.startswith("lora_") for k in keys):
        return "a LoRA"
    if "encoder.conv_out.weight" in keys and "decoder.conv_in.weight" in keys:
        latent = shapes["encoder.conv_out.weight"][0] // 2
        if latent == 32 and "bn.running_mean" in keys:
            return FLUX2_VAE
        return VAE if latent == 16 else f"a VAE with {latent} latent channels (FLUX.1's has 16, FLUX.2's 32)"
    if "text_model.embeddings.token_embedding.weight" in keys:
        return CLIP_L
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return T5
    if {"model.layers.0.self_attn.q_norm.weight", "layers.0.self_attn.q_norm.weight"} & keys:
        return QWEN3
    if any(k.endswith("layers.0.self_attn.q_proj.weight") for k in keys):
        return "a Mistral-style text encoder (FLUX.2 [dev]'s, which the command line does not load)"
    return "not a model this trainer knows"


def inspect(path: Path, flag: str, expected: str | tuple[str, ...]) -> Weights:
    """The header of `path`, checked to be `expected` (one kind, or one of several); a RecipeError
    naming the flag, the file and what was expected otherwise."""
    kinds = (expected,) if isinstance(expected, str) else expected
    wanted = " or ".join(EXPECTED[k] for k in kinds)
    if path.suffix.lower() == ".gguf":
        raise RecipeError(f"{flag} {path}: a GGUF file; the command line reads .safetensors files (train GGUF "
                          "models in ComfyUI through ComfyUI-GGUF's loader). Expected " + wanted + ".")
    if not path.is_file():
        raise RecipeError(f"{flag} {path}: no such file. Expected {wanted}.")
    try:
        header = read_header(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{flag} {path}: can't be read as safetensors ({e}). Expected {wanted}.") from None
    header.pop("__metadata__", None)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}
    kind = kind_of(shapes)
    if kind not in kinds:
        what = EXPECTED[kind].split(" (")[0] if kind in EXPECTED else kind
        raise RecipeError(f"{flag} {path}: this is {what}; expected {wanted}.")
    return Weights(path, shapes, dtypes, kind)
