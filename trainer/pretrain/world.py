"""A synthetic captioned world for pretraining the tiny FLUX: one shape of one colour on a plain
background, at one of five places ("a red circle on a blue background, top left").

Small enough to learn on a CPU in minutes, rich enough that a prompt visibly steers a sample:
colour, shape and place are each checkable on decoded pixels (`describe`), so a test can ask
whether "a red circle …" came out red, round and in the right corner.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "white": (240, 240, 240), "black": (25, 25, 25), "orange": (240, 140, 30), "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
          "bottom right": (0.7, 0.7), "in the center": (0.5, 0.5)}
SIZE = 0.36  # the shape's bounding box, as a fraction of the image side


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    place: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background, {self.place}"


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(sorted(COLOURS), 2)
    return Scene(colour, rng.choice(SHAPES), rng.choice(sorted(PLACES)), background)


def draw(scene: Scene, size: int = 64, jitter: float = 0.0, rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB image. `jitter` moves and resizes the shape by up to that fraction of
    the side (with `rng`), so the model learns places, not single pixel positions."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    cx, cy = PLACES[scene.place]
    half = SIZE / 2 * (1 + rng.uniform(-jitter, jitter))
    cx, cy = cx + rng.uniform(-jitter, jitter) / 2, cy + rng.uniform(-jitter, jitter) / 2
    box = [(cx - half) * size, (cy - half) * size, (cx + half) * size, (cy + half) * size]
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


@dataclass(frozen=True)
class Reading:
    """What `describe` saw in an image: each field the nearest named value, or None."""
    colour: str | None
    shape: str | None
    place: str | None
    background: str | None

    def matches(self, scene: Scene) -> bool:
        return (self.colour, self.shape, self.place) == (scene.colour, scene.shape, scene.place)


def describe(image: Image.Image | np.ndarray, min_area: float = 0.03, max_area: float = 0.5) -> Reading:
    """Read colour, shape and place of the one foreground shape off an image's pixels.

    Background: the median colour of the border. Foreground: pixels far from it. Shape: how much of
    its bounding box the foreground fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2). Colour and
    background: the nearest named colour to each region's median. A foreground smaller than
    `min_area` or larger than `max_area` of the image (noise, a wash of colour) is no shape."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > 60
    if not min_area <= mask.mean() <= max_area:
        return Reading(None, None, None, _nearest(background))
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    centre = ((xs.min() + xs.max()) / 2 / w, (ys.min() + ys.max()) / 2 / h)
    place = min(PLACES, key=lambda p: (PLACES[p][0] - centre[0]) ** 2 + (PLACES[p][1] - centre[1]) ** 2)
    return Reading(_nearest(np.median(pixels[mask], axis=0)), shape, place, _nearest(background))


def _nearest(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - rgb) ** 2)))
