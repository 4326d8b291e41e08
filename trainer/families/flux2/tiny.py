"""An embedded tiny FLUX.2 [klein]: diffusers' Flux2Transformer2DModel, its AutoencoderKLFlux2 and a
transformers Qwen3 text encoder at toy widths, random but seeded weights.

The FLUX.2 counterpart of flux1/tiny.py: the whole pipeline (encode, train, sample, export) on a
CPU in seconds. Text goes in as [klein]'s does: the caption in Qwen3's chat template, padded to
512 tokens, and the hidden states after three of its layers (9, 18 and 27 of Qwen3-4B's 36: a
quarter, a half and three quarters in) side by side. Tokens are UTF-8 bytes, as the FLUX.1 tiny's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...data.encode import weights_fingerprint
from ..flux1.tiny import ByteTokenizer
from .diffusers import TEXT_TOKENS, DiffusersFlux2

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3's, no thinking
TEXT_WIDTH, TEXT_LAYERS = 32, 4  # the tiny Qwen3: its context is 3 × 32 = 96 wide


def hidden_layers(num_layers: int) -> tuple[int, int, int]:
    """The hidden states [klein] reads: (9, 18, 27) of Qwen3's 36 layers, at any depth."""
    return tuple(num_layers // 4 * k for k in (1, 2, 3))


def byte_tokens(caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of a caption in the chat template, as bytes padded to 512."""
    ids = list(CHAT.format(caption).encode("utf-8"))[:TEXT_TOKENS]
    pad = TEXT_TOKENS - len(ids)
    return torch.tensor(ids + [ByteTokenizer.PAD] * pad), torch.tensor([1] * len(ids) + [0] * pad)


def qwen_tokens(tokenizer) -> Callable[[str], tuple[torch.Tensor, torch.Tensor]]:
    """A real Qwen3 tokenizer's (ids, mask), as diffusers' Flux2KleinPipeline makes them."""
    def tokens(caption: str):
        text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        out = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=TEXT_TOKENS)
        return out.input_ids[0], out.attention_mask[0]
    return tokens


@torch.no_grad()
def encode_qwen(text_encoder, tokens: Callable, caption: str) -> torch.Tensor:
    """A caption's context (512, 3·width): three hidden states of the Qwen3 model side by side."""
    p = next(text_encoder.parameters())
    ids, mask = tokens(caption)
    out = text_encoder(input_ids=ids[None].to(p.device), attention_mask=mask[None].to(p.device),
                       output_hidden_states=True, use_cache=False)
    layers = hidden_layers(text_encoder.config.num_hidden_layers)
    return torch.cat([out.hidden_states[k][0] for k in layers], dim=-1)


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, 32, h, w) -> (B, 128, h/2, w/2): each 2×2 patch's channels together."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the transformer's latents (B, 128, H/16, W/16), batch-normed as FLUX.2's."""
    z = patchify(vae.encode(pixels * 2 - 1).latent_dist.mode())
    mean, std = _bn(vae, z)
    return (z - mean) / std


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _bn(vae, latents)
    return ((vae.decode(unpatchify(latents * std + mean)).sample + 1) / 2).clamp(0, 1)


@dataclass
class TinyFlux2:
    """FLUX.2 as diffusers/transformers models, with the tiny FLUX.1 set's interface (train.py's)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    seed: int
    tokens: Callable = byte_tokens
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"tiny-flux2 klein (random weights, seed {self.seed})"

    def backend(self) -> DiffusersFlux2:
        return DiffusersFlux2(self.transformer)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return vae_encode(self.vae, pixels.to(p.device, p.dtype)).float().cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return vae_decode(self.vae, latents.to(p.device, p.dtype)).float().cpu()

    def encode_text(self, caption: str) -> tuple[torch.Tensor, None]:
        return encode_qwen(self.text_encoder, self.tokens, caption).float().cpu(), None

    def identity(self) -> dict[str, str]:
        return {"images": weights_fingerprint(self.vae, "flux2"), "text": weights_fingerprint(self.text_encoder)}

    def trainable_text(self):
        raise ValueError("text_encoder_lr: training the text encoder is for FLUX.1's CLIP-L and T5; FLUX.2's Qwen3 "
                         "trains frozen here. Set train.text_encoder_lr to 0.")


@torch.no_grad()
def _calibrate(vae) -> None:
    """The batch norm's statistics from smooth random images, so normalised latents have unit
    spread as FLUX.2's do (its running mean and variance are part of the VAE file)."""
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=64, mode="bilinear")
    z = patchify(vae.encode(smooth * 2 - 1).latent_dist.mode())
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))


def build(seed: int = 0) -> TinyFlux2:
    """The tiny FLUX.2 set, identical for the same seed (weights come from a private RNG stream)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            num_layers=2, num_single_layers=2, attention_head_dim=128, num_attention_heads=2,
            joint_attention_dim=3 * TEXT_WIDTH, guidance_embeds=False)
        vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
        _calibrate(vae)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=ByteTokenizer.VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=64,
            num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=TEXT_TOKENS, pad_token_id=ByteTokenizer.PAD))
    for m in (transformer, vae, text_encoder):
        m.eval().requires_grad_(False)
    return TinyFlux2(transformer, vae, text_encoder, seed)
