"""Data-parallel training (trainer/loop/distributed.py) on CPU with gloo: two processes under
torchrun train the LoRA one process trains with their whole batch, checkpoints move between
process counts both ways, and a rank killed mid-run leaves the last checkpoint whole."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import cli
from trainer.cli import train as cli_train
from trainer.data import datasets
from trainer.data.augment import Augmentation
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.loop.distributed import Ranks, rebatched
from trainer.loop.memory import MemoryConfig
from trainer.loop.text_phase import text_targets
from trainer.loop.trainer import TrainConfig, Trainer, step_loss
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs import checkpoints, export
from trainer.outputs.checkpoints import RunFolder

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "trainer" / "assets" / "quickstart"
RECIPE = """\
dataset: {folders: photos, trigger: sks, resolution: 64, bucketing: false}
layers: {preset: attention, rank: 4}
train:
  steps: 4
  learning_rate: 3e-3
  seed: 0
  max_grad_norm: 0.01       # clipping on: it must see the whole batch's gradient
  gradient_accumulation_steps: 2
  memory: {checkpointing: "off"}
save: {every: 2, keep_last: 0, name: toy, output: runs}
"""


@pytest.fixture(scope="module")
def small_flux():
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_cli import small_flux

    return small_flux()


@pytest.fixture
def recipe(tmp_path, small_flux, monkeypatch):
    """Three photos (an epoch of 2-photo batches ends on a batch of one: a rank with nothing to train)."""
    monkeypatch.setattr(cli_train, "tiny_model", lambda: small_flux)
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt", "04.jpg", "04.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def train(recipe: Path, out: Path, *options: str) -> None:
    """One process, in this one."""
    assert cli.main(["train", "--config", str(recipe), "--model", "tiny", "--out", str(out), *options]) == 0


def torchrun(recipe: Path, out: Path, *options: str, env: dict | None = None) -> subprocess.Popen:
    """Two processes, as a user starts them: torchrun, gloo, a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "ddp_cli.py"), "train", "--config", str(recipe), "--model", "tiny",
               "--out", str(out), *options]
    return subprocess.Popen(command, cwd=recipe.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def lora_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's LoRA as it trains (fp32; the LoRA files are fp16 or bf16)."""
    return checkpoints.load_state(checkpoint)["lora"]


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding: summing the gradient in two parts rounds otherwise, and Adam
    turns a rounding of a near-zero gradient into up to 1 % of a step (5e-5 of the 3e-3 steps)."""
    assert a.keys() == b.keys() and a
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith(".up")) > 1e-3  # trained: up starts at 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5, msg=lambda m: f"{k}: {m}")


def test_two_processes_of_batch_1_train_the_lora_one_process_trains_with_batch_2(recipe, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(recipe, one, "--set", "batch_size=2")
    reference = RunFolder(one / "toy_001")
    assert [c.name for c in reference.checkpoints()] == ["step_000002", "step_000004"]

    output = finished(torchrun(recipe, two, "--set", "batch_size=1", "--set", "steps=2"))
    assert "Data-parallel run: 2 processes (gloo)" in output
    assert "Rank 1 encoded" not in output  # rank 1 read what rank 0 encoded
    assert sorted(p.name for p in two.iterdir()) == ["cache", "toy_001", "toy_001.safetensors"]  # rank 0 wrote once
    assert any((two / "cache").rglob("*.safetensors"))
    run = RunFolder(two / "toy_001")
    (step_2,) = run.checkpoints()
    assert_same_lora(lora_of(step_2), lora_of(reference.checkpoints()[0]))
    losses = json.loads((run.path / "summary.json").read_text())["losses"]
    expected = json.loads((reference.path / "summary.json").read_text())["losses"]
    assert losses == pytest.approx(expected[:2], rel=1e-5)  # the mean over both ranks' photos
    assert len((run.path / "loss_history.csv").read_text().splitlines()) == 3  # a header and two steps, once

    train(recipe, two, "--set", "batch_size=2", "--resume", "latest")  # 2 processes -> 1, the same 2-photo batches
    assert_same_lora(lora_of(run.latest()), lora_of(reference.latest()))
    assert export.load(two / "toy_001.safetensors").keys() == export.load(one / "toy_001.safetensors").keys()
    resumed = json.loads((run.path / "summary.json").read_text())
    assert resumed["losses"] == pytest.approx(expected, rel=1e-5)


def rank_pid(parent: int, rank: int) -> int | None:
    """The process torchrun started as `rank` (Linux: its environment in /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def wait_for(condition, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if condition():
                return True
        except OSError:  # a checkpoint swept while it was listed
            pass
        time.sleep(0.01)
    return False


def test_rank_0_killed_in_a_checkpoint_write_leaves_the_last_one_whole_and_one_process_resumes(recipe, tmp_path):
    out = tmp_path / "runs"
    train(recipe, out, "--set", "batch_size=1", "--set", "steps=1", "--set", "save_every=1")  # 1 process -> 2
    run = RunFolder(out / "toy_001")
    pause = {"FLUX_DREAMBOOTH_SAVE_PAUSE": "0.3"}  # each checkpoint write waits before it is renamed into place
    process = torchrun(recipe, out, "--set", "batch_size=1", "--set", "steps=1000", "--set", "save_every=1",
                       "--set", "keep_last=2", "--resume", "latest", env=pause)
    try:
        assert wait_for(lambda: run.latest() is not None and checkpoints.step_of(run.latest()) >= 3)
        assert wait_for(lambda: any(run.checkpoint_dir.glob(".tmp-*")))
        rank_0 = rank_pid(process.pid, 0)
        assert rank_0 is not None
        os.kill(rank_0, signal.SIGKILL)
        output, _ = process.communicate(timeout=120)  # torchrun ends rank 1 and fails
    finally:
        process.kill()
    assert process.returncode != 0 and "resuming step_000001" in output
    newest = run.latest()
    state = checkpoints.load_state(newest)
    assert state["step"] == checkpoints.step_of(newest) >= 3 and state["batch"] == 2
    lora, _ = checkpoints.load_lora(newest)
    assert lora and all(torch.isfinite(t).all() for t in lora.values())

    steps = state["step"] + 2  # 2 processes -> 1, with a batch of 1: the epoch's rest cut into batches of 1
    train(recipe, out, "--set", "batch_size=1", "--set", f"steps={steps}", "--set", "save_every=1",
          "--resume", "latest")
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from"] == str(newest)
    assert summary["losses"][:state["step"]] == state["losses"]
    assert not list(run.checkpoint_dir.glob(".tmp-*"))


def test_each_rank_trains_its_slice_and_a_resumed_epoch_is_cut_again():
    assert [list(Ranks(r, 2).share(3)) for r in range(2)] == [[0], [1, 2]]
    assert [list(Ranks(r, 2).share(1)) for r in range(2)] == [[], [0]]
    assert [list(Ranks(r, 4).share(8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    bucket = {0: "a", 1: "b", 2: "a", 3: "a", 4: "b"}.get
    assert rebatched([[0, 2], [1, 4], [3]], 1, bucket) == [[0], [2], [1], [4], [3]]
    assert rebatched([[0], [1], [2], [4], [3]], 2, bucket) == [[0, 2], [1, 4], [3]]  # one bucket per batch


def test_the_slices_gradients_add_up_to_the_whole_batchs_with_dop_the_text_encoder_and_network_weight(recipe):
    """What each rank computes, in one process: its slice of a batch, with the whole batch's draws.
    The slices' gradients and losses (DOP's term too) add up to the whole batch's, live caption
    embeddings through a trained text encoder and a photo at another LoRA multiplier included."""
    options = datasets.Options(trigger_word="sks", class_word="toy", shaping=Shaping(64, bucketing=False),
                               augment=Augmentation(caption_dropout=0.3, shuffle_tags=True))
    small_flux = cli_train.tiny_model()
    examples = encode_dataset(datasets.from_folder(recipe.parent / "photos", options), small_flux, dop_class="")[0]
    examples[1] = dataclasses.replace(examples[1], network_weight=0.5)
    backend = small_flux.backend()
    config = TrainConfig(batch_size=3, dop_multiplier=0.7, text_encoder_lr=5e-4,
                         memory=MemoryConfig(checkpointing="off"))
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    text = small_flux.trainable_text()
    lora = LoraSet(spec.targets(backend.dims) + text_targets(config, text, spec), seed=1)
    with torch.no_grad():
        for w in lora:  # as after some training: every part has a gradient
            w.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    trainer = Trainer(backend, lora, [e.copied() for e in examples], config, text)
    results = []
    with backend.training(lora, config.memory), trainer.text.embeddings(lora) as embed:
        for share in (None, range(0, 1), range(1, 3), range(3, 3)):
            trainer.preservation.start_step()
            loss = step_loss(backend, trainer.examples, config, torch.Generator().manual_seed(7),
                             preserve=trainer.preservation, text=embed, lora=lora, share=share)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainer.params]
            results.append((loss.detach(), trainer.preservation.total.clone(), grads))
            lora.zero_grad(set_to_none=True)
    (loss, kept, whole), *parts = results
    assert float(parts[2][0]) == 0 and not any(g.any() for g in parts[2][2])  # an empty slice trains nothing
    torch.testing.assert_close(sum(p[0] for p in parts), loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sum(p[1] for p in parts), kept, rtol=1e-5, atol=1e-7)
    assert float(kept) > 0 and sum(bool(g.any()) for g in whole) == len(whole)
    for k, want in enumerate(whole):
        torch.testing.assert_close(sum(p[2][k] for p in parts), want, rtol=1e-4, atol=1e-7)
