"""What a run tells the person watching it: progress figures, the loss plot and history, and
the sample grid and progress strip (pictures with PIL only)."""

from __future__ import annotations

import csv
import io
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .. import files

HISTORY_COLUMNS = ("step", "loss", "loss_smooth", "lr")


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    loss_smooth: float
    lr: float
    seconds_per_step: float
    eta_seconds: float
    peak_memory_gib: float
    memory_device: str
    preservation_loss: float | None = None  # differential output preservation's term, not part of loss

    def line(self) -> str:
        eta = time.strftime("%H:%M:%S", time.gmtime(self.eta_seconds))
        dop = "" if self.preservation_loss is None else f"  dop {self.preservation_loss:.4f}"
        return (f"step {self.step}/{self.total}  loss {self.loss:.4f} (avg {self.loss_smooth:.4f}){dop}  "
                f"lr {self.lr:.2e}  {self.seconds_per_step:.2f} s/step  ETA {eta}  "
                f"peak {self.peak_memory_gib:.1f} GiB {self.memory_device}")


class Average:
    """Exponential moving average, bias-corrected (as Adam's moments) so early values are a
    plain mean rather than stuck near the first one."""

    def __init__(self, smoothing: float):
        self.smoothing, self.raw, self.count = smoothing, 0.0, 0

    def add(self, value: float) -> float:
        self.count += 1
        self.raw += self.smoothing * (value - self.raw)
        return self.raw / (1 - (1 - self.smoothing) ** self.count)


class ProgressTracker:
    """Turns step reports into the figures the panel and console show: a smoothed loss (over
    about 20 steps), seconds per step averaged the same way, ETA, and peak memory."""

    def __init__(self, total: int, device: torch.device, smoothing: float = 0.05):
        self.total, self.device = total, device
        self.loss_average, self.time_average = Average(smoothing), Average(smoothing)
        self.last = time.perf_counter()
        self.history: list[tuple[int, float, float, float]] = []  # step, loss, smoothed, lr

    def replay(self, losses: list[float], lrs: list[float]) -> None:
        """Fill the history with the steps of a run this one resumes."""
        for step, (loss, lr) in enumerate(zip(losses, lrs), 1):
            self.history.append((step, loss, self.loss_average.add(loss), lr))

    def restart_clock(self) -> None:
        """Call after a pause (samples, checkpoints) so it does not count as training time."""
        self.last = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, preservation_loss: float | None = None) -> Progress:
        now = time.perf_counter()
        seconds = self.time_average.add(now - self.last)
        self.last = now
        smooth = self.loss_average.add(loss)
        self.history.append((step, loss, smooth, lr))
        peak, where = peak_memory_gib(self.device)
        return Progress(step, self.total, loss, smooth, lr, seconds, seconds * (self.total - step), peak, where,
                        preservation_loss)


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "RAM"


def write_history(folder: Path, history: list[tuple[int, float, float, float]]) -> None:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(HISTORY_COLUMNS)
    writer.writerows(history)
    files.write_text(folder / "loss_history.csv", table.getvalue())
    files.write_json(folder / "loss_history.json", [dict(zip(HISTORY_COLUMNS, row)) for row in history])


def loss_plot(history: list[tuple[int, float, float, float]], scores=(), size=(640, 360)) -> Image.Image:
    """Raw loss (light) and smoothed loss (dark) against step, with the axis ranges written on;
    with `scores` (outputs/scores.py's rows), likeness (green) and drift (red) on a scale of their own."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 56, w - 12, 12, h - 28
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if len(history) >= 2:
        steps = [r[0] for r in history]
        values = [r[1] for r in history] + [r[2] for r in history]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-6
        x = lambda s: left + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (right - left)  # noqa: E731
        y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        draw.line([(x(r[0]), y(r[1])) for r in history], fill=(150, 180, 230), width=1)
        draw.line([(x(r[0]), y(r[2])) for r in history], fill=(20, 60, 160), width=2)
        draw.text((4, top), f"{hi:.3f}", fill="black", font=font)
        draw.text((4, bottom - 10), f"{lo:.3f}", fill="black", font=font)
        draw.text((left, bottom + 8), f"step {steps[0]}", fill="black", font=font)
        draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill="black", font=font)
        _score_lines(draw, font, [r for r in scores if steps[0] <= r.step <= steps[-1]], x, top, bottom, right)
    draw.text((left + 8, top + 4), "loss (raw, smoothed)", fill=(20, 60, 160), font=font)
    return img


def _score_lines(draw, font, rows, x, top, bottom, right) -> None:
    if not rows:
        return
    values = [r.likeness for r in rows] + [r.drift for r in rows]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    for name, colour in (("likeness", (30, 150, 60)), ("drift", (200, 50, 40))):
        points = [(x(r.step), y(getattr(r, name))) for r in rows]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    draw.text((right - 150, top + 4), f"likeness, drift {lo:.2f}–{hi:.2f}", fill=(30, 150, 60), font=font)


@dataclass(frozen=True)
class Sample:
    """One validation render: which eval entry (prompt × seed × guidance × steps) at which step."""

    step: int
    entry: int
    label: str
    path: Path

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def save_samples(folder: Path, samples: list[Sample]) -> None:
    files.write_json(folder / "samples.json", [s.as_dict() for s in samples], indent=1)


def load_samples(folder: Path) -> list[Sample]:
    path = folder / "samples.json"
    if not path.is_file():
        return []
    return [Sample(d["step"], d["entry"], d["label"], Path(d["path"])) for d in json.loads(path.read_text())
            if Path(d["path"]).is_file()]


def write_loss_plot(path: Path, history: list[tuple[int, float, float, float]], scores=()) -> Path:
    return files.write_image(path, loss_plot(history, scores))


def write_sample_grid(path: Path, samples: list[Sample]) -> Path:
    return files.write_image(path, sample_grid(samples))


def sample_grid(samples: list[Sample], cell: int = 192) -> Image.Image:
    """Eval entries as rows, checkpoints (steps) as columns, labelled."""
    steps = sorted({s.step for s in samples})
    entries = sorted({s.entry for s in samples})
    labels = {s.entry: s.label for s in samples}
    font, pad_x, pad_y = ImageFont.load_default(), 200, 18
    grid = Image.new("RGB", (pad_x + cell * len(steps), pad_y + cell * len(entries)), "white")
    draw = ImageDraw.Draw(grid)
    for c, step in enumerate(steps):
        draw.text((pad_x + c * cell + 4, 3), f"step {step}", fill="black", font=font)
    for r, entry in enumerate(entries):
        draw.multiline_text((4, pad_y + r * cell + 4), _wrap(labels[entry], 30), fill="black", font=font)
    for s in samples:
        with Image.open(s.path) as im:
            tile = im.convert("RGB").resize((cell, cell))
        grid.paste(tile, (pad_x + steps.index(s.step) * cell, pad_y + entries.index(s.entry) * cell))
    return grid


def progress_strip(samples: list[Sample], path: Path, entry: int = 0, ms_per_frame: int = 600) -> Path | None:
    """One eval entry across checkpoints as an animated GIF (a training-progress strip)."""
    frames = []
    for s in sorted((s for s in samples if s.entry == entry), key=lambda s: s.step):
        with Image.open(s.path) as im:
            frame = im.convert("RGB")
        ImageDraw.Draw(frame).text((6, 6), f"step {s.step}", fill="white", font=ImageFont.load_default())
        frames.append(frame)
    if not frames:
        return None
    return files.write_image(path, frames[0], "GIF", save_all=True, append_images=frames[1:],
                             duration=ms_per_frame, loop=0)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A picture as (H, W, 3) floats in [0, 1], ComfyUI's IMAGE layout without the batch."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
