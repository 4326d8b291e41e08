"""Augmentations, all off by default: flipping a face or shifting skin colour changes the
subject's likeness. Each image gets a few augmented views, encoded once with the rest of the
cache; training picks one per step. The maths are kornia's; the randomness is a seeded
generator, so a run is repeatable."""

from __future__ import annotations

from dataclasses import dataclass

import kornia
import torch


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False  # horizontal flip, half of the views
    color_jitter: float = 0.0  # brightness, contrast and saturation ±this, hue ±this/4
    views: int = 4  # augmented versions per image when anything here (or a random crop) is on
    caption_dropout: float = 0.0  # probability that a step sees only the trigger word and class
    shuffle_tags: bool = False  # shuffle comma-separated tags after the first one

    def __post_init__(self):
        checks = [(0 <= self.color_jitter <= 0.5, f"color_jitter is {self.color_jitter}; keep it within 0–0.5 "
                                                  "(0.05–0.1 is gentle)."),
                  (1 <= self.views <= 32, f"views is {self.views}; use 1–32 (4 is plenty)."),
                  (0 <= self.caption_dropout < 1, f"caption_dropout is {self.caption_dropout}; use 0–0.9 "
                                                  "(ai-toolkit recipes use 0.18–0.25).")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def view_count(self, random_crop: bool) -> int:
        if self.color_jitter > 0 or random_crop:
            return self.views
        return min(2, self.views) if self.flip else 1  # a flip alone makes one other picture

    def apply(self, pixels: torch.Tensor, view: int, generator: torch.Generator) -> torch.Tensor:
        """View `view` of (3, H, W) pixels in [0, 1]; view 0 is always the image as it is."""
        if view == 0:
            return pixels
        x = pixels[None]
        if self.flip and view % 2 == 1:
            x = kornia.geometry.transform.hflip(x)
        if self.color_jitter > 0:
            j = self.color_jitter
            u = (torch.rand(4, generator=generator) * 2 - 1) * j
            x = kornia.enhance.adjust_brightness(x, float(u[0]))
            x = kornia.enhance.adjust_contrast(x, 1 + float(u[1]))
            x = kornia.enhance.adjust_saturation(x, 1 + float(u[2]))
            x = kornia.enhance.adjust_hue(x, float(u[3]) * torch.pi / 4)
        return x[0].clamp(0, 1)
