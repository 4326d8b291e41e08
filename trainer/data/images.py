"""Photos as they come off a phone, made into training pixels.

Opening: EXIF orientation honoured; alpha composed on white; palette, CMYK, 16-bit and
greyscale converted properly; HEIC through pillow-heif when it is installed. Decoding stays
within a memory bound: a JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers its
bucket (PIL's draft), other formats are reduced right after decoding, and a photo too large to
decode safely (over MAX_DECODE_PIXELS) is named instead of crashing on PIL's
DecompressionBombError. Shaping: aspect-ratio buckets at a target pixel area (sides multiples
of 16) so portrait and landscape photos keep their shape; a photo is never enlarged but trains
at the largest bucket it covers; resize to cover the bucket, then a center or random crop.
"""

from __future__ import annotations

import io
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError, features

try:  # HEIC/HEIF (iPhone photos): read when pillow-heif is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF = True
except ImportError:
    HEIF = False

HEIF_EXTENSIONS = (".heic", ".heif")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif") + HEIF_EXTENSIONS
MAX_RATIO = 4.0  # the widest bucket is 4:1
MAX_DECODE_PIXELS = 100_000_000  # about 400 MB while decoding; JPEGs count at their 1/8 draft scale
_DRAFTS = ("JPEG",)  # formats PIL can decode at a reduced scale
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK")  # modes whose pixels average correctly in Image.reduce
_LIMIT = threading.Lock()


class ImageProblem(ValueError):
    """An image that cannot be used as it is, with what to do about it."""


def unreadable_format(path: Path) -> str | None:
    """What to install when this Pillow can't read the file's format, else None."""
    suffix = path.suffix.lower()
    if suffix in HEIF_EXTENSIONS and not HEIF:
        return ("is HEIC/HEIF, which this installation can't read: install pillow-heif (pip install pillow-heif, "
                "with ComfyUI's python) or save it as JPEG")
    if suffix == ".avif" and not features.check("avif"):
        return ("is AVIF, which this Pillow can't read: upgrade Pillow to 11.2 or later, install "
                "pillow-avif-plugin, or save it as JPEG")
    return None


@contextmanager
def _opened(path: Path):
    """The file opened by PIL with this module's size limit instead of Pillow's: its global
    MAX_IMAGE_PIXELS (89 MP) refuses a 200 MP phone JPEG that decodes cheaply at 1/8 scale, and
    raises DecompressionBombError without a file name. It is lifted only while the header is read
    (under a lock); `_too_big` then applies the limit that matters: pixels actually decoded."""
    with _LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        yield im


def _too_big(im: Image.Image) -> str | None:
    w, h = im.size
    scale = 8 if im.format in _DRAFTS else 1
    if (w // scale) * (h // scale) <= MAX_DECODE_PIXELS:
        return None
    return (f"is {w}×{h} ({w * h / 1e6:.0f} MP), more than the {MAX_DECODE_PIXELS / 1e6:.0f} MP decoded at once "
            "(a memory bound); save it smaller, e.g. 4096 px on the long side" + ("" if scale > 1 else ", or as JPEG"))


def _orientation(im: Image.Image) -> int:
    return im.getexif().get(0x0112, 1)


def inspect(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) as displayed, None) if the file decodes completely within the memory
    bound, else (None, what is wrong with it). A JPEG is decoded at 1/8 scale: every byte is still
    read, so a truncated file shows."""
    problem = unreadable_format(path)
    if problem:
        return None, problem
    try:
        stat = path.stat()
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    return _inspect(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4096)
def _inspect(path: Path, length: int, mtime_ns: int) -> tuple[tuple[int, int] | None, str | None]:
    """`inspect` once per version of a file: several resolutions of one folder decode it once."""
    if length == 0:
        return None, "is empty (0 bytes)"
    try:
        with _opened(path) as im:
            problem = _too_big(im)
            if problem:
                return None, problem
            w, h = im.size
            size = (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)
            im.draft(None, (1, 1))
            im.load()
    except UnidentifiedImageError:
        return None, "is not an image PIL can read"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return None, f"cannot be decoded ({e}); it may be truncated or corrupt"
    return size, None


def check(path: Path) -> str | None:
    """None if the file decodes completely (within the memory bound), else what is wrong with it."""
    return inspect(path)[1]


def size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF rotation."""
    with _opened(path) as im:
        w, h = im.size
        orientation = _orientation(im)
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
    return im if im.mode == "RGB" else im.convert("RGB")  # no copy of an RGB photo: it may be large


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation → the transposition that shows it upright


def open_rgb(path: Path, bucket: tuple[int, int] | None = None) -> Image.Image:
    """The photo as 8-bit RGB, upright. With the `bucket` it will be shaped to, a large photo is
    decoded small: a JPEG at the draft scale that still covers the bucket, other formats reduced
    (box average) to no less than twice the size that covers it, before anything is copied."""
    with _opened(path) as im:
        problem = _too_big(im)
        if problem:
            raise ImageProblem(f"{path.name} {problem}.")
        orientation = _orientation(im)
        cover = None
        if bucket:
            w, h = im.size if orientation not in (5, 6, 7, 8) else im.size[::-1]
            scale = max(bucket[0] / w, bucket[1] / h)
            cover = (math.ceil(w * scale), math.ceil(h * scale))  # as displayed
            cover = cover if orientation not in (5, 6, 7, 8) else cover[::-1]  # in the file's orientation
            im.draft(None, cover)
        im.load()
        if cover and im.mode in _REDUCIBLE:
            factor = min(im.width // (2 * cover[0]), im.height // (2 * cover[1]))
            if factor >= 2:
                im = im.reduce(factor)
        if orientation in _TRANSPOSE:
            im = im.transpose(_TRANSPOSE[orientation])
        return to_rgb(im)


def bucket_step(resolution: int) -> int:
    """Bucket sides step in 16 px for small resolutions, 32 at 512, 64 at 1024."""
    return max(16, resolution // 16 // 16 * 16)


@lru_cache(maxsize=512)
def buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """(width, height) pairs of about resolution² pixels (never more), sides multiples of the step,
    from 1:4 to 4:1."""
    step, area = bucket_step(resolution), resolution * resolution
    out = []
    for w in range(step, resolution * 4 + 1, step):
        h = area // w // step * step
        if h >= step and 1 / MAX_RATIO <= w / h <= MAX_RATIO:
            out.append((w, h))
    return tuple(out)


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
    upscale_small: bool = False  # enlarge a photo smaller than its bucket instead of using a smaller bucket
    minimum_image_size: int = 0  # shorter side a photo needs, in px (SimpleTuner's); 0: half the resolution
    maximum_image_size: int = 0  # SimpleTuner's: a photo larger than this (√(w·h), px) is first downsampled…
    target_downsample_size: int = 0  # …to this size (0: the resolution), then cropped to its bucket; 0 0: off

    def __post_init__(self):
        if self.resolution % 16 or self.resolution < 64:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 16, at least 64 (512 or 1024 for "
                             "FLUX).")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop is {self.crop!r}; choose 'center' or 'random'.")
        if not 0 <= self.target_downsample_size <= self.maximum_image_size <= 65535 and self.maximum_image_size:
            raise ValueError(f"maximum_image_size {self.maximum_image_size} with target_downsample_size "
                             f"{self.target_downsample_size}: photos larger than maximum_image_size are downsampled "
                             "to target_downsample_size, so it must not be larger (SimpleTuner: e.g. 1536 and 1024).")
        if self.target_downsample_size and not self.maximum_image_size:
            raise ValueError(f"target_downsample_size is {self.target_downsample_size} but maximum_image_size is 0: "
                             "set maximum_image_size, the size above which photos are downsampled.")
        if not 0 <= self.minimum_image_size <= 65535:
            raise ValueError(f"minimum_image_size is {self.minimum_image_size}; give the shorter side a photo needs "
                             "in pixels (e.g. 256), or 0 for half the resolution.")

    @property
    def minimum(self) -> int:
        return self.minimum_image_size or self.resolution // 2

    def bucket(self, width: int, height: int, name: str) -> tuple[int, int]:
        """The bucket of a width×height image. Never enlarged (unless upscale_small): a photo smaller
        than its bucket trains at the largest bucket of about its shape that it covers, as ai-toolkit
        does. Refuses one whose shorter side is under the minimum, naming it."""
        if min(width, height) < self.minimum:
            why = f"minimum_image_size {self.minimum_image_size}" if self.minimum_image_size else \
                f"half the resolution {self.resolution} (minimum_image_size 0)"
            raise ImageProblem(f"{name} is {width}×{height}: its shorter side is under {why}; use a larger photo, "
                               "or lower minimum_image_size or the resolution.")
        bw, bh = pick_bucket(width, height, self.resolution, self.bucketing)
        if self.upscale_small or (width >= bw and height >= bh):
            return bw, bh
        for r in range(self.resolution - 16, 15, -16):
            bw, bh = pick_bucket(width, height, r, self.bucketing)
            if width >= bw and height >= bh:
                return bw, bh
        raise ImageProblem(f"{name} is {width}×{height}: too small for any bucket; use a larger photo.")

    def apply(self, image: Image.Image, bucket: tuple[int, int], generator: torch.Generator | None = None
              ) -> torch.Tensor:
        """Resize to cover the bucket, crop to it: (3, H, W) floats in [0, 1]. A photo above
        maximum_image_size is resized to target_downsample_size instead (when that still covers the
        bucket), so the crop keeps a closer view of it, as SimpleTuner does."""
        bw, bh = bucket
        w, h = image.size
        scale = max(bw / w, bh / h)
        if self.maximum_image_size and math.sqrt(w * h) > self.maximum_image_size:
            scale = max(scale, (self.target_downsample_size or self.resolution) / math.sqrt(w * h))
        rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
        image = image.resize((rw, rh), Image.LANCZOS)
        if self.crop == "random" and generator is not None:
            left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator))
            top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator))
        else:
            left, top = (rw - bw) // 2, (rh - bh) // 2
        image = image.crop((left, top, left + bw, top + bh))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def from_tensor(pixels: torch.Tensor) -> Image.Image:
    """A ComfyUI IMAGE (H, W, 3) in [0, 1] as a PIL image."""
    return Image.fromarray((pixels.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a ComfyUI IMAGE batch of one, (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
