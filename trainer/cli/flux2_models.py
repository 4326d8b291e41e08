"""FLUX.2 [klein] from local files without ComfyUI: diffusers' Flux2Transformer2DModel and
AutoencoderKLFlux2, transformers' Qwen3Model, each built from its own file with a config read from
the weights' shapes (nothing is fetched from the hub).

The transformer file is BFL's layout (ComfyUI's models/diffusion_models), converted by diffusers'
own converter at any width; the VAE is BFL's LDM layout plus its latent batch-norm statistics
(flux2-vae.safetensors); the text encoder is ComfyUI's qwen_3_4b.safetensors (transformers' keys)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..families.flux1.tiny import ByteTokenizer
from ..families.flux2 import bfl
from ..families.flux2.tiny import TinyFlux2, byte_tokens, qwen_tokens
from ..log import logger
from ..recipe.fields import RecipeError
from . import diffusers_models as dm
from . import weights
from .weights import TRANSFORMER, VAE

log = logger(__name__)

TEXT_ENCODER = "text_encoder"
QWEN3_PAD = 151643  # Qwen3's <|endoftext|>, its padding token (ComfyUI's and diffusers' too)
BN_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def transformer(w: weights.Weights, dtype: torch.dtype):
    from diffusers import Flux2Transformer2DModel

    state = dm.state_dict(w.path, dtype)
    if "x_embedder.weight" in state:  # diffusers' keys in one file: its config from the BFL names' shapes
        return dm._build(Flux2Transformer2DModel, bfl.transformer_config(
            {k: tuple(v.shape) for k, v in bfl.to_bfl(state).items()}), state, w.path)
    return dm._build(Flux2Transformer2DModel, bfl.transformer_config(w.shapes), bfl.to_diffusers(state), w.path)


def vae(w: weights.Weights, dtype: torch.dtype):
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {k: v for k, v in dm.vae_config(w.shapes).items() if k not in ("scaling_factor", "shift_factor")}
    state = dm.state_dict(w.path, dtype)
    stats = {k: state.pop(k) for k in BN_KEYS if k in state}
    converted = convert_ldm_vae_checkpoint(state, config)
    stats.setdefault("bn.num_batches_tracked", torch.tensor(0))
    return dm._build(AutoencoderKLFlux2, config, {**converted, **stats}, w.path)


def text_encoder(w: weights.Weights, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3Model

    state = {k.removeprefix("model."): v for k, v in dm.state_dict(w.path, dtype).items() if k != "lm_head.weight"}
    s = {k: tuple(v.shape) for k, v in state.items()}
    vocab, hidden = s["embed_tokens.weight"]
    head = s["layers.0.self_attn.q_norm.weight"][0]
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=s["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=1 + max(int(k.split(".")[1]) for k in s if k.startswith("layers.")),
        num_attention_heads=s["layers.0.self_attn.q_proj.weight"][0] // head,
        num_key_value_heads=s["layers.0.self_attn.k_proj.weight"][0] // head, head_dim=head,
        pad_token_id=ByteTokenizer.PAD if vocab == ByteTokenizer.VOCAB else QWEN3_PAD)
    return dm._pretrained(Qwen3Model, config, state, dtype)


def tokens(folder: Path | None):
    """The text encoder's tokens: Qwen3's tokenizer from `folder`/tokenizer (a diffusers [klein]
    folder's, or --tokenizers); without one, the tiny FLUX.2's bytes (models.plan allows that only
    for a text encoder of their 259-token vocabulary)."""
    if folder is None:
        return byte_tokens
    from transformers import AutoTokenizer

    where = folder / "tokenizer"
    if not where.is_dir():
        raise RecipeError(f"--tokenizers {folder}: no tokenizer/ folder (diffusers' FLUX.2 [klein] layout: "
                          "tokenizer/ with Qwen3's tokenizer files).")
    return qwen_tokens(AutoTokenizer.from_pretrained(str(where), local_files_only=True))


def load(p, device: torch.device, dtype: torch.dtype) -> TinyFlux2:
    """The FLUX.2 of a plan (models.Plan), with the tiny set's interface, on `device`."""
    models = {}
    for part, load_file in ((TRANSFORMER, transformer), (VAE, vae), (TEXT_ENCODER, text_encoder)):
        log.info("Loading %s from %s.", part, p.parts[part].path)
        models[part] = load_file(p.parts[part], dtype).to(device).eval().requires_grad_(False)
    return TinyFlux2(models[TRANSFORMER], models[VAE], models[TEXT_ENCODER], seed=0, tokens=tokens(p.tokenizers),
                     label=p.name)
