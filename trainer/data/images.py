"""Photos as they come off a phone, made into training pixels.

Opening: EXIF orientation honoured; alpha composed on white; palette, CMYK, 16-bit and
greyscale converted properly. Shaping: aspect-ratio buckets at a target pixel area (sides
multiples of 16) so portrait and landscape photos keep their shape; resize to cover the bucket,
then a center or random crop.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_RATIO = 4.0  # the widest bucket is 4:1


class ImageProblem(ValueError):
    """An image that cannot be used as it is, with what to do about it."""


def check(path: Path) -> str | None:
    """None if the file decodes completely, else what is wrong with it."""
    try:
        with Image.open(path) as im:
            im.load()
    except UnidentifiedImageError:
        return "is not an image PIL can read"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be decoded ({e}); it may be truncated or corrupt"
    return None


def size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF rotation."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode: 16-bit and float greys scaled (not clipped), CMYK through
    its ICC profile when it has one, transparency composed on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            top = max(1.0, float(a.max()))
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "CMYK" and im.info.get("icc_profile"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (OSError, ImageCms.PyCMSError):
            im = im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(ImageOps.exif_transpose(im))


def bucket_step(resolution: int) -> int:
    """Bucket sides step in 16 px for small resolutions, 32 at 512, 64 at 1024."""
    return max(16, resolution // 16 // 16 * 16)


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels (never more), sides multiples of the step,
    from 1:4 to 4:1."""
    step, area = bucket_step(resolution), resolution * resolution
    out = []
    for w in range(step, resolution * 4 + 1, step):
        h = area // w // step * step
        if h >= step and 1 / MAX_RATIO <= w / h <= MAX_RATIO:
            out.append((w, h))
    return out


def pick_bucket(width: int, height: int, resolution: int, bucketing: bool = True) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (square without bucketing)."""
    if not bucketing:
        return resolution, resolution
    ratio = math.log(width / height)
    return min(buckets(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Shaping:
    """How an image becomes training pixels."""

    resolution: int = 512
    bucketing: bool = True
    crop: str = "center"  # or "random"
    upscale_small: bool = False

    def __post_init__(self):
        if self.resolution % 16 or self.resolution < 64:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 16, at least 64 (512 or 1024 for "
                             "FLUX).")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop is {self.crop!r}; choose 'center' or 'random'.")

    def bucket(self, width: int, height: int, name: str) -> tuple[int, int]:
        """The bucket of a width×height image; refuses one it would have to enlarge (unless
        upscale_small), naming it and saying what would fit."""
        bw, bh = pick_bucket(width, height, self.resolution, self.bucketing)
        if (width < bw or height < bh) and not self.upscale_small:
            fits = next((r for r in range(self.resolution - 16, 63, -16) if _covers(width, height, r, self.bucketing)),
                        None)
            advice = f"lower resolution to {fits} or less" if fits else "use a larger photo"
            raise ImageProblem(f"{name} is {width}×{height}, smaller than its {bw}×{bh} bucket at resolution "
                               f"{self.resolution}: {advice}, turn on upscale_small, or replace it.")
        return bw, bh

    def apply(self, image: Image.Image, bucket: tuple[int, int], generator: torch.Generator | None = None
              ) -> torch.Tensor:
        """Resize to cover the bucket, crop to it: (3, H, W) floats in [0, 1]."""
        bw, bh = bucket
        w, h = image.size
        scale = max(bw / w, bh / h)
        rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
        image = image.resize((rw, rh), Image.LANCZOS)
        if self.crop == "random" and generator is not None:
            left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator))
            top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator))
        else:
            left, top = (rw - bw) // 2, (rh - bh) // 2
        image = image.crop((left, top, left + bw, top + bh))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _covers(width: int, height: int, resolution: int, bucketing: bool) -> bool:
    bw, bh = pick_bucket(width, height, resolution, bucketing)
    return width >= bw and height >= bh


def from_tensor(pixels: torch.Tensor) -> Image.Image:
    """A ComfyUI IMAGE (H, W, 3) in [0, 1] as a PIL image."""
    return Image.fromarray((pixels.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
