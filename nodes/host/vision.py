"""ComfyUI's CLIP_VISION (the stock Load CLIP Vision node's output: CLIP-ViT-L, SigLIP…) as the image
embedder the scores use (../../trainer/outputs/scores.py), and a toy-width one for the tiny FLUX."""

from __future__ import annotations

import tempfile
from pathlib import Path

import comfy.clip_vision
import torch

from ...trainer import files

TINY_CONFIG = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
               "image_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
               "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
               "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16,
               "torch_dtype": "float32"}


class ClipVisionEmbedder:
    """Images (N, H, W, 3) in [0, 1] -> the CLIP_VISION's image embeddings (N, D), as CLIP Vision
    Encode makes them (centre crop to the model's input size)."""

    def __init__(self, clip_vision):
        if not hasattr(clip_vision, "encode_image"):
            raise ValueError(f"clip_vision is a {type(clip_vision).__name__}, not a CLIP_VISION; connect "
                             "Load CLIP Vision (clip_vision_vit_l, sigclip_vision_patch14_384).")
        self.clip_vision = clip_vision

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], 8):  # a few at a time: a validation set can be large
            encoded = self.clip_vision.encode_image(images[start:start + 8].float(), crop=True)
            embeds = encoded["image_embeds"]
            if embeds is None:  # a vision model without a projection: its pooled last layer
                embeds = encoded["last_hidden_state"][:, 0]
            out.append(embeds.float().cpu())
        return torch.cat(out)


def tiny_clip_vision(seed: int = 0):
    """A CLIP vision model at toy width (32 px, 2 layers, seeded weights) through ComfyUI's own
    ClipVisionModel: for the tiny FLUX and the tests only; its scores mean nothing on real photos."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in TINY_CONFIG.items()
                                                                  if k not in ("model_type", "torch_dtype")}))
    with tempfile.TemporaryDirectory() as folder:  # ComfyUI up to v0.3.x reads the config from a file only
        path = Path(folder) / "tiny_clip_vision.json"
        files.write_json(path, TINY_CONFIG)
        model = comfy.clip_vision.ClipVisionModel(str(path))
    missing, _ = model.load_sd(reference.state_dict())
    if missing:
        raise RuntimeError(f"The tiny CLIP vision model lacks weights ComfyUI expects: {missing[:4]}")
    return model
