import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.outputs import progress


def history(n=50):
    tracker = progress.ProgressTracker(n, torch.device("cpu"))
    for step in range(1, n + 1):
        tracker.update(step, 2.0 / step ** 0.5 + 0.1 * (step % 3), 1e-4)
    return tracker


def test_average_is_a_mean_at_first_and_smooths_later():
    average = progress.Average(0.05)
    assert average.add(4.0) == pytest.approx(4.0)
    assert average.add(2.0) == pytest.approx((4.0 * 0.95 + 2.0) / 1.95)  # older values weigh 0.95 as much
    for _ in range(500):
        value = average.add(1.0)
    assert value == pytest.approx(1.0, abs=1e-6)


def test_progress_figures():
    tracker = history(10)
    progress = tracker.update(10, 1.0, 1e-4)
    assert progress.step == 10 and progress.total == 10 and progress.eta_seconds == 0
    assert progress.peak_memory_gib > 0 and progress.memory_device == "RAM"
    assert "step 10/10" in progress.line()


def test_history_files_and_plot(tmp_path):
    tracker = history()
    progress.write_history(tmp_path, tracker.history)
    rows = json.loads((tmp_path / "loss_history.json").read_text())
    assert len(rows) == 50 and rows[0]["step"] == 1 and rows[-1]["loss_smooth"] < rows[0]["loss_smooth"]
    assert (tmp_path / "loss_history.csv").read_text().splitlines()[0] == "step,loss,loss_smooth,lr"
    plot = np.asarray(progress.loss_plot(tracker.history))
    assert plot.shape == (360, 640, 3)
    assert (plot[:, :, 2] > plot[:, :, 0] + 60).sum() > 300  # blue curves were drawn


def test_grid_and_progress_strip(tmp_path):
    samples = []
    for step in (0, 50, 100):
        for entry in (0, 1):
            path = tmp_path / f"{step}_{entry}.png"
            Image.new("RGB", (64, 64), (step, 100 * entry, 0)).save(path)
            samples.append(progress.Sample(step, entry, f"prompt {entry}", path))
    grid = progress.sample_grid(samples, cell=64)
    assert grid.size == (200 + 3 * 64, 18 + 2 * 64)
    assert grid.getpixel((200 + 64 + 30, 18 + 64 + 30)) == (50, 100, 0)  # row 1 (entry 1), column 1 (step 50)
    strip = progress.progress_strip(samples, tmp_path / "strip.gif", entry=1)
    with Image.open(strip) as gif:
        assert gif.n_frames == 3
    progress.save_samples(tmp_path, samples)
    assert progress.load_samples(tmp_path) == samples
