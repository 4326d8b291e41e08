"""The image embedder `train` scores with (validation.scores): a transformers CLIP or SigLIP vision
model from a local folder, or the toy's fixed pooling embedder ('pixels')."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..outputs import scores
from ..recipe.fields import RecipeError

PIXELS = "pixels"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class VisionModel:
    """A transformers vision model (CLIPVisionModelWithProjection, CLIPModel, SiglipVisionModel…): its
    projected image embedding, else its pooled output, of each image resized and normalised as its
    preprocessor_config.json says (CLIP's values without one)."""

    def __init__(self, folder: Path, device: torch.device):
        import transformers

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        kind = (config.get("architectures") or ["AutoModel"])[0]
        self.model = getattr(transformers, kind, transformers.AutoModel).from_pretrained(folder).to(device).eval()
        vision = getattr(self.model.config, "vision_config", self.model.config)
        pre = folder / "preprocessor_config.json"
        pre = json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {}
        self.size = int(vision.image_size)
        self.mean = torch.tensor(pre.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", CLIP_STD)).view(1, 3, 1, 1)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = scores.channels_last(images).float().permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device)
        if hasattr(self.model, "get_image_features"):  # CLIPModel, SiglipModel: a tensor, or (transformers 5)
            out = self.model.get_image_features(pixel_values=x)  # an output whose pooler_output is projected
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).float().cpu()
        out = self.model(pixel_values=x)
        found = getattr(out, "image_embeds", None)  # CLIPVisionModelWithProjection; else the pooled output
        return (found if found is not None else out.pooler_output).float().cpu()


def check(value: str, base: Path) -> Path | None:
    """validation.scores as a folder (None for 'pixels' or off), checked before anything is loaded."""
    if not value or value == PIXELS:
        return None
    folder = Path(value).expanduser()
    folder = folder if folder.is_absolute() else base / folder
    if not (folder / "config.json").is_file():
        raise RecipeError(f"validation.scores {value!r}: {folder} is not a vision model folder (no config.json); "
                          f"give a local transformers CLIP or SigLIP folder, or '{PIXELS}' for the tiny model.")
    return folder


def load(value: str, base: Path, device: torch.device) -> scores.ImageEmbedder | None:
    if not value:
        return None
    folder = check(value, base)
    return scores.PooledPixels() if folder is None else VisionModel(folder, device)
