"""What `train` reports while it runs: the progress bar, TensorBoard events, and its exit codes,
Ctrl-C (a real SIGINT to a `python -m trainer` process) among them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import cli
from trainer.cli import train as cli_train
from trainer.outputs import checkpoints
from trainer.outputs.checkpoints import RunFolder

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "trainer" / "assets" / "quickstart"
RECIPE = """\
dataset: {folders: photos, trigger: sks, resolution: 64, bucketing: false}
layers: {preset: attention, rank: 4}
train: {steps: 4, learning_rate: 3e-3, seed: 0, memory: {checkpointing: "off"}}
save: {every: 100, keep_last: 0, name: toy, output: runs}
"""


@pytest.fixture
def recipe(tmp_path, tiny_flux, monkeypatch):
    monkeypatch.setattr(cli_train, "tiny_model", lambda: tiny_flux)
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path / "recipe.yaml"


def test_the_bar_shows_step_loss_speed_and_eta_beside_the_json_lines(recipe, capsys, caplog):
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--progress", "bar",
                     "--log-format", "json", "--log-every", "2"]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if "4/4" in line][-1]
    assert "loss " in last and "s/step" in last and "ETA 00:00:00" in last, bar
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert [line["step"] for line in lines] == [1, 2, 4]  # the machine-readable lines still come
    caplog.clear()
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--progress", "bar"]) == 0
    assert "step 4/4" not in caplog.text  # text lines: the bar shows them instead


def test_report_to_tensorboard_writes_the_loss_and_the_samples(recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--report-to", "tensorboard",
                     "--set", 'validation.prompts=["a photo of [trigger]"]', "--set", "validation.every=2",
                     "--set", "validation.steps=2", "--set", "validation.before_training=false"]) == 0
    run = tmp_path / "runs" / "toy_001"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    summary = json.loads((run / "summary.json").read_text())
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx(summary["losses"], rel=1e-6)
    assert [e.step for e in events.Images("samples/00")] == [2, 4]
    assert events.Scalars("fixed_noise_loss/after")[0].value == pytest.approx(summary["fixed_noise_loss_after"])


def test_report_to_tensorboard_without_it_installed_says_so_before_anything_is_written(recipe, tmp_path,
                                                                                       monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--report-to", "tensorboard"]) == 1
    assert "the tensorboard package is not installed" in caplog.text and "pip install tensorboard" in caplog.text
    assert not (tmp_path / "runs").exists()


def test_sigint_to_the_process_exits_130_with_a_checkpoint_that_resumes(tmp_path):
    """A real Ctrl-C (SIGINT) to `python -m trainer train` mid-run: exit 130, a complete checkpoint
    of the step it stopped at, and `--resume latest` continues from it to the end (exit 0)."""
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    command = [sys.executable, "-m", "trainer", "train", "--config", str(tmp_path / "recipe.yaml"), "--model", "tiny",
               "--log-format", "json", "--log-every", "1", "--set", "steps=400"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # progress lines as the steps are trained
        if line.startswith("{") and json.loads(line)["step"] >= 2:
            seen.append(json.loads(line)["step"])
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "no progress line"
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Stopped by Ctrl-C" in rest and "--resume latest" in rest
    run = RunFolder(tmp_path / "runs" / "toy_001")
    latest = run.latest()
    stopped = checkpoints.step_of(latest)
    assert seen[0] <= stopped < 400 and checkpoints.load_state(latest)["step"] == stopped
    assert not (tmp_path / "runs" / "toy_001.safetensors").exists()  # no LoRA file for an unfinished run
    done = subprocess.run([*command[:-1], f"steps={stopped + 2}", "--resume", "latest"], cwd=tmp_path, env=env,
                          stderr=subprocess.PIPE, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["steps"] == stopped + 2 and len(summary["losses"]) == stopped + 2
    assert summary["resumed_from"] == str(latest)
