"""An embedded tiny FLUX: the real architectures at toy widths, random but seeded weights.

Lets anyone run the whole pipeline (encode, train, sample, export) on a CPU in seconds, before
fetching 30 GB of real weights. Tokens are plain UTF-8 bytes, so no tokenizer files are needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ...data.encode import weights_fingerprint
from .diffusers import DiffusersFlux
from .text import TransformersText

# FLUX's VAE latent normalisation, kept so the tiny set uses the same formulas.
VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159
CLIP_TOKENS, T5_TOKENS = 77, 64


class ByteTokenizer:
    """UTF-8 bytes as token ids (0–255), plus pad, begin and end."""

    PAD, BOS, EOS = 256, 257, 258
    VOCAB = 259

    def __call__(self, text: str, length: int, bos: bool = True) -> torch.Tensor:
        ids = ([self.BOS] if bos else []) + list(text.encode("utf-8"))[: length - 1 - bos] + [self.EOS]
        return torch.tensor(ids + [self.PAD] * (length - len(ids)))


@dataclass
class TinyFlux:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module
    t5: torch.nn.Module
    seed: int
    tokenizer: ByteTokenizer = ByteTokenizer()
    pretrained: bool = False  # weights from `python -m trainer pretrain` (else seeded random ones)

    @property
    def name(self) -> str:
        return f"tiny-flux ({'pretrained on the shapes world' if self.pretrained else 'random weights'}, " \
               f"seed {self.seed})"

    def backend(self) -> DiffusersFlux:
        return DiffusersFlux(self.transformer)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels * 2 - 1).latent_dist.mode()
        return (z - VAE_SHIFT) * VAE_SCALE

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> RGB in [0, 1], (B, 3, H, W)."""
        return ((self.vae.decode(latents / VAE_SCALE + VAE_SHIFT).sample + 1) / 2).clamp(0, 1)

    def identity(self) -> dict[str, str]:
        return {"images": weights_fingerprint(self.vae),
                "text": weights_fingerprint(self.t5, weights_fingerprint(self.clip))}

    @torch.no_grad()
    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainable_text().encode(caption)

    def trainable_text(self) -> TransformersText:
        """The CLIP-L and T5 encoders, for a run that trains a LoRA on them."""
        return TransformersText(self.clip, self.t5, lambda c: self.tokenizer(c, CLIP_TOKENS),
                                lambda c: self.tokenizer(c, T5_TOKENS, bos=False))


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values for a state dict's keys, for models whose layers leave weights
    uninitialised (ComfyUI's): norms 1, biases 0, matrices ~ N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if "norm" in key.lower() and key.endswith(("weight", "scale")):
            out[key] = torch.ones(shape)
        elif key.endswith("bias"):
            out[key] = torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 50  # a conv's: in × kernel
            out[key] = torch.randn(shape, generator=generator) / fan_in ** 0.5
    return out


@torch.no_grad()
def _calibrate(vae) -> None:
    """Scale the random encoder so normalised latents have unit spread, as FLUX's do, and the
    decoder's input by the inverse, so decode(encode(x)) is unchanged."""
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=64, mode="bilinear")
    z = vae.encode(smooth * 2 - 1).latent_dist.mode()
    k = 1.0 / (z.std().item() * VAE_SCALE)
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.post_quant_conv.weight /= k


def build(seed: int = 0, hidden_heads: int = 2, double_blocks: int = 2, single_blocks: int = 4,
          clip_heads: int = 2) -> TinyFlux:
    """The tiny set, identical for the same seed (weights come from a private RNG stream).
    `clip_heads=1`: CLIP heads 64 wide, as CLIP-L's are (what a clip_l file's loader assumes)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = ByteTokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double_blocks, num_single_layers=single_blocks,
            attention_head_dim=128, num_attention_heads=hidden_heads, joint_attention_dim=64,
            pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
            scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT)
        _calibrate(vae)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=tok.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=clip_heads, max_position_embeddings=CLIP_TOKENS, pad_token_id=tok.PAD,
            bos_token_id=tok.BOS, eos_token_id=tok.EOS))
        t5 = T5EncoderModel(T5Config(
            vocab_size=tok.VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
            pad_token_id=tok.PAD, eos_token_id=tok.EOS, feed_forward_proj="gated-gelu"))
    for m in (transformer, vae, clip, t5):
        m.eval().requires_grad_(False)
    return TinyFlux(transformer, vae, clip, t5, seed)


PRETRAINED = Path(__file__).resolve().parents[2] / "assets" / "tiny_flux"
COMPONENTS = ("transformer", "vae", "clip", "t5")
BUILD_KEY = "flux_dreambooth.tiny"  # the build arguments, in each file's header


def load_pretrained(folder: Path = PRETRAINED) -> TinyFlux:
    """The tiny set `python -m trainer pretrain --out FOLDER` wrote (one safetensors file per model)."""
    missing = [f"{name}.safetensors" for name in COMPONENTS if not (folder / f"{name}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {', '.join(missing)}: write the pretrained tiny FLUX there with "
                                f"`python -m trainer pretrain --out {folder}`.")
    with safe_open(str(folder / "transformer.safetensors"), "pt") as f:
        build_args = json.loads((f.metadata() or {})[BUILD_KEY])
    model = build(**build_args)
    for name in COMPONENTS:
        module = getattr(model, name)
        with safe_open(str(folder / f"{name}.safetensors"), "pt") as f:
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        module.load_state_dict(state, strict=True)
    model.pretrained = True
    return model


def embedded(pretrained: bool = True, seed: int = 0) -> TinyFlux:
    """The tiny FLUX the quickstart, the Tiny FLUX node and `--model tiny` use: the pretrained set the
    pack ships (it draws the shapes world, so a LoRA's effect is visible), or `tiny.build(seed)`'s
    seeded random weights (for tests and for a pipeline check without any meaning)."""
    return load_pretrained() if pretrained else build(seed)
