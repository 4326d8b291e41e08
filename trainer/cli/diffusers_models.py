"""FLUX.1 from local files without ComfyUI: diffusers' FluxTransformer2DModel and AutoencoderKL,
transformers' CLIPTextModel and T5EncoderModel, each built from its own file with a config read
from the weights' shapes (never from the hub: nothing is downloaded).

diffusers' own `from_single_file` needs a hub config (or a local copy of one) and assumes FLUX.1's
3072 width when it converts a BFL file, so the BFL conversion is bfl.py's, at any width; the VAE is
converted by diffusers' own LDM converter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..families.flux1 import bfl
from ..families.flux1.text import TransformersText
from ..families.flux1.tiny import CLIP_TOKENS, VAE_SCALE, VAE_SHIFT, ByteTokenizer, TinyFlux
from . import weights

T5_TOKENS = 512  # FLUX.1-dev's max_sequence_length
CLIP_HEAD_WIDTH = 64  # CLIP-L: 768 wide, 12 heads (not stored in the weights)
UNUSED_TEXT_KEYS = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")


def state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors in `dtype`; ComfyUI's scaled fp8 (`scale_weight` beside each
    weight) multiplied out."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out = {}
    for k, t in raw.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = raw.get(k.removesuffix(".weight") + ".scale_weight") if k.endswith(".weight") else None
        t = t.to(torch.float32) * scale.to(torch.float32) if scale is not None else t
        out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def _build(cls, config: dict, state: dict[str, torch.Tensor], path: Path):
    """A diffusers model of `config` holding `state`, built without random init (meta tensors first)."""
    with torch.device("meta"):
        model = cls(**config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights don't fit {cls.__name__}: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}.")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{path}: {cls.__name__} left {meta[:4]} unset.")
    return model


def transformer(w: weights.Weights, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    state = state_dict(w.path, dtype)
    if "x_embedder.weight" in state:  # diffusers' keys in one file
        return _build(FluxTransformer2DModel, _diffusers_config(w.shapes), state, w.path)
    return _build(FluxTransformer2DModel, bfl.transformer_config(w.shapes), bfl.to_diffusers(state), w.path)


def _diffusers_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    count = bfl.block_count
    return {"patch_size": 1, "in_channels": shapes["x_embedder.weight"][1],
            "num_layers": count(shapes, "transformer_blocks"),
            "num_single_layers": count(shapes, "single_transformer_blocks"), "attention_head_dim": head_dim,
            "num_attention_heads": shapes["x_embedder.weight"][0] // head_dim,
            "joint_attention_dim": shapes["context_embedder.weight"][1],
            "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
            "axes_dims_rope": (16, 56, 56)}


def vae_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """AutoencoderKL's arguments for an LDM-layout VAE (ae.safetensors), from its shapes."""
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    per_block = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
    return {"in_channels": shapes["encoder.conv_in.weight"][1], "out_channels": shapes["decoder.conv_out.weight"][0],
            "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)),
            "layers_per_block": per_block, "latent_channels": shapes["encoder.conv_out.weight"][0] // 2,
            "scaling_factor": VAE_SCALE, "shift_factor": VAE_SHIFT,
            "use_quant_conv": "quant_conv.weight" in shapes, "use_post_quant_conv": "post_quant_conv.weight" in shapes,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes}


def vae(w: weights.Weights, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = vae_config(w.shapes)
    return _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(state_dict(w.path, dtype), config), w.path)


def clip_l(w: weights.Weights, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    s = w.shapes
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // CLIP_HEAD_WIDTH,
        intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=1 + max(int(k.split(".")[3]) for k in s if k.startswith("text_model.encoder.layers.")),
        max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
        bos_token_id=vocab - 2, eos_token_id=vocab - 1,  # CLIP's <|startoftext|>, <|endoftext|> (the tiny's too)
        pad_token_id=ByteTokenizer.PAD if vocab == ByteTokenizer.VOCAB else 1)
    state = {k: v for k, v in state_dict(w.path, dtype).items() if k not in UNUSED_TEXT_KEYS}
    return _pretrained(CLIPTextModel, config, state, dtype)


def t5(w: weights.Weights, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    s = w.shapes
    buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    vocab, d_model = s.get("shared.weight") or s["encoder.embed_tokens.weight"]
    byte = vocab == ByteTokenizer.VOCAB
    config = T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
        d_kv=s["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=s[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"][0],
        num_layers=1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.block.")),
        feed_forward_proj="gated-gelu" if gated else "relu",
        pad_token_id=ByteTokenizer.PAD if byte else 0, eos_token_id=ByteTokenizer.EOS if byte else 1)
    state = state_dict(w.path, dtype)
    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    state.setdefault("shared.weight", shared)
    state.setdefault("encoder.embed_tokens.weight", shared)
    return _pretrained(T5EncoderModel, config, state, dtype)


def _pretrained(cls, config, state, dtype):
    """transformers' own loading of a state dict (meta init, tied weights, buffers), nothing fetched."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def tokenizers(folder: Path | None) -> tuple[Callable, Callable]:
    """(CLIP tokenize, T5 tokenize): from a folder's tokenizer/ and tokenizer_2/ (a diffusers FLUX
    folder's, or --tokenizers); without one, the embedded tiny FLUX's byte tokens (models.plan allows
    that only for encoders of its 259-token vocabulary)."""
    if folder is None:
        tok = ByteTokenizer()
        return (lambda c: tok(c, CLIP_TOKENS)), (lambda c: tok(c, 64, bos=False))
    from transformers import AutoTokenizer

    def load(name: str, length: int):
        where = folder / name
        if not where.is_dir():
            raise FileNotFoundError(f"--tokenizers {folder}: no {name}/ folder (diffusers' FLUX.1 layout: "
                                    "tokenizer/ for CLIP-L, tokenizer_2/ for T5).")
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        return lambda c: tok(c, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids[0]

    return load("tokenizer", CLIP_TOKENS), load("tokenizer_2", T5_TOKENS)


@dataclass
class LoadedFlux(TinyFlux):
    """FLUX.1 from files as diffusers/transformers models: the tiny set's interface, on any device."""

    label: str = ""
    clip_tokens: Callable | None = None
    t5_tokens: Callable | None = None

    @property
    def name(self) -> str:
        return self.label

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return super().encode_images(pixels.to(p.device, p.dtype)).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return super().decode(latents.to(p.device, p.dtype)).float().cpu()

    @torch.no_grad()
    def encode_text(self, caption: str):
        context, pooled = self.trainable_text().encode(caption)
        return context.float().cpu(), pooled.float().cpu()

    def trainable_text(self) -> TransformersText:
        return TransformersText(self.clip, self.t5, self.clip_tokens, self.t5_tokens)
