import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainer.data import datasets
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.loop.trainer import TrainConfig, Trainer
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs import checkpoints, export

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
CONFIG = dict(steps=10, learning_rate=1e-3, batch_size=2, seed=3, lr_schedule="cosine", warmup_steps=2,
              ema_decay=0.9)


@pytest.fixture(scope="module")
def examples(tiny_flux):
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64, bucketing=False))
    return encode_dataset(datasets.from_folder(QUICKSTART, options), tiny_flux)[0]


def new_trainer(tiny_flux, examples, **overrides):
    backend = tiny_flux.backend()
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    lora = LoraSet(spec.targets(backend.dims), seed=1)
    return Trainer(backend, lora, examples, TrainConfig(**{**CONFIG, **overrides})), spec


def save(run, trainer, spec):
    state = {**trainer.state(), **checkpoints.describe(spec, trainer.backend.dims)}
    return run.save(trainer.step, export.kohya_state_dict(trainer.result_lora()), {}, state)


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tiny_flux, examples, tmp_path):
    straight, spec = new_trainer(tiny_flux, examples)
    straight.run()

    first, _ = new_trainer(tiny_flux, examples)
    first.run(until=5)
    checkpoint = save(checkpoints.RunFolder(tmp_path), first, spec)
    second, _ = new_trainer(tiny_flux, examples)  # as a new process would: from the files only
    second.load_state(checkpoints.load_state(checkpoint))
    assert second.step == 5
    second.run()

    assert second.losses == straight.losses
    for a, b in zip(second.lora.parameters(), straight.lora.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(second.result_lora().parameters(), straight.result_lora().parameters()):
        assert torch.equal(a, b)  # the EMA too


def test_checkpoint_lora_is_the_trained_lora(tiny_flux, examples, tmp_path):
    trainer, spec = new_trainer(tiny_flux, examples, steps=3)
    trainer.run()
    checkpoint = save(checkpoints.RunFolder(tmp_path), trainer, spec)
    loaded = checkpoints.load_trained_lora(checkpoint)
    expected = export.kohya_state_dict(trainer.result_lora())
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    on_disk, _ = checkpoints.load_lora(checkpoint)
    assert all(torch.equal(on_disk[k], expected[k]) for k in expected)


def test_only_the_newest_are_kept_and_latest_follows_writes(tmp_path):
    run = checkpoints.RunFolder(tmp_path / "a_001")
    for step in (10, 20, 30, 40):
        run.save(step, {"w": torch.ones(1)}, {}, {"step": step}, keep=2)
    assert [checkpoints.step_of(c) for c in run.checkpoints()] == [30, 40]
    other = checkpoints.next_run_folder(tmp_path, "a")
    assert other.path.name == "a_002"
    time.sleep(0.01)
    other.save(5, {"w": torch.ones(1)}, {}, {"step": 5})
    assert checkpoints.latest_checkpoint(tmp_path, "a") == other.path / "checkpoints" / "step_000005"
    assert checkpoints.latest_checkpoint(tmp_path, "b") is None


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    """A run resumed from step 10 reaches step 20 again: the new step 20 replaces the old one."""
    run = checkpoints.RunFolder(tmp_path)
    run.save(20, {"w": torch.ones(2)}, {}, {"step": 20, "tag": "old"})
    run.save(20, {"w": torch.zeros(2)}, {}, {"step": 20, "tag": "new"})
    assert checkpoints.load_state(run.latest())["tag"] == "new"
    assert torch.equal(checkpoints.load_lora(run.latest())[0]["w"], torch.zeros(2))
    assert [p.name for p in run.checkpoint_dir.iterdir()] == ["step_000020"]


def test_a_kill_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    """A real process dies halfway through writing step 20 (after the LoRA, inside the state)."""
    script = textwrap.dedent(f"""
        import os, torch
        from trainer.outputs.checkpoints import RunFolder
        run = RunFolder({str(tmp_path)!r})
        run.save(10, {{"w": torch.ones(4)}}, {{}}, {{"step": 10}})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"half a state")
            os._exit(9)
        torch.save = dying_save
        run.save(20, {{"w": torch.full((4,), 2.0)}}, {{}}, {{"step": 20}})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 9
    run = checkpoints.RunFolder(tmp_path)
    assert [checkpoints.step_of(c) for c in run.checkpoints()] == [10]
    assert checkpoints.load_state(run.latest())["step"] == 10
    assert any(p.name.startswith(".tmp-") for p in run.checkpoint_dir.iterdir())  # the wreck, ignored
    run.save(30, {"w": torch.ones(1)}, {}, {"step": 30})
    assert not any(p.name.startswith(".tmp-") for p in run.checkpoint_dir.iterdir())  # and swept


def test_nan_stops_the_run_and_keeps_earlier_checkpoints(tiny_flux, examples, tmp_path):
    trainer, spec = new_trainer(tiny_flux, examples, steps=8, ema_decay=0.0, warmup_steps=0)
    run = checkpoints.RunFolder(tmp_path)
    velocity, calls = trainer.backend.velocity, []

    def poisoned(*args):
        calls.append(1)
        return velocity(*args) * (float("nan") if len(calls) > 5 else 1.0)  # one batch per step: step 6

    trainer.backend.velocity = poisoned
    with pytest.raises(FloatingPointError, match="step 6.*Checkpoints saved before this step are intact"):
        while trainer.step < 8:
            trainer.run(until=trainer.step + 2)
            save(run, trainer, spec)
    assert [checkpoints.step_of(c) for c in run.checkpoints()] == [2, 4]
    assert torch.isfinite(torch.tensor(checkpoints.load_state(run.latest())["losses"])).all()


def test_resuming_past_the_end_is_a_clear_error(tiny_flux, examples, tmp_path):
    trainer, spec = new_trainer(tiny_flux, examples, steps=4)
    trainer.run()
    checkpoint = save(checkpoints.RunFolder(tmp_path), trainer, spec)
    shorter, _ = new_trainer(tiny_flux, examples, steps=2, warmup_steps=0)
    with pytest.raises(ValueError, match="step 4, past steps \\(2\\); raise steps"):
        shorter.load_state(checkpoints.load_state(checkpoint))
