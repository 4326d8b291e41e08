"""Writes the bundled edit pairs (`builtin:kontext`): shapes on a grey ground (the controls, before
the edit) and the same shapes recoloured red (the targets, after it), with the edit's caption.

Run from the repository root: `python -m trainer.assets.make_kontext_pairs`. Seeded, so the files
come out the same each time; a few KB of PNGs in all.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from .. import files

ROOT = Path(__file__).resolve().parent / "kontext"
SIZE = 96
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"blue": (40, 80, 200), "green": (40, 160, 70), "yellow": (220, 200, 40)}
EDIT = (210, 40, 40)  # what the edit paints the shape
CAPTION = "make the {shape} red"


def _draw(shape: str, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)],
                  fill=colour)
    return im


def write(root: Path = ROOT, seed: int = 0) -> list[str]:
    """The pairs under root/targets (with .txt captions) and root/controls; returns their names."""
    rng = random.Random(seed)
    (root / "targets").mkdir(parents=True, exist_ok=True)
    (root / "controls").mkdir(parents=True, exist_ok=True)
    names = []
    for i, (shape, colour) in enumerate((s, c) for s in SHAPES for c in ("blue", "green") if rng.random() < 0.9):
        size = rng.randint(36, 60)
        x, y = rng.randint(8, SIZE - size - 8), rng.randint(8, SIZE - size - 8)
        box = (x, y, x + size, y + size)
        name = f"{i + 1:02d}_{colour}_{shape}"
        files.write_image(root / "controls" / f"{name}.png", _draw(shape, COLOURS[colour], box), optimize=True)
        files.write_image(root / "targets" / f"{name}.png", _draw(shape, EDIT, box), optimize=True)
        files.write_text(root / "targets" / f"{name}.txt", CAPTION.format(shape=shape) + "\n")
        names.append(name)
    return names


if __name__ == "__main__":
    import sys

    sys.stdout.write("\n".join(write()) + "\n")
