"""Kill -9 a training process at random moments, some inside a checkpoint write; after each kill the
newest checkpoint on disk must load, and the next process must resume from it.

    python tests/fault_kill.py FOLDER --trials 20 --seed 0

This driver imports the library and builds the tiny FLUX once, on one thread and without autograd,
then forks each training process from itself (so forking is safe and a trial costs no start-up);
it only reads checkpoints, as a user would.
It prints one line per trial and a summary: "20/20 kills: newest checkpoint loaded and resumed".
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.data.encode import Example  # noqa: E402
from trainer.families.flux1 import tiny  # noqa: E402
from trainer.loop.trainer import TrainConfig, Trainer  # noqa: E402
from trainer.lora.targets import LayerSpec  # noqa: E402
from trainer.lora.weights import LoraSet  # noqa: E402
from trainer.outputs import checkpoints, export  # noqa: E402

TOTAL_STEPS = 100_000  # never reached by a killed process
MARKER = "resumed.txt"


def train_child(model: tiny.TinyFlux, folder: Path, until: int | None, save_pause: float) -> None:
    """A training process: resume from the newest checkpoint (if any), say from which step, then
    train with a checkpoint every step (keep 2)."""
    if save_pause:
        os.environ["FLUX_DREAMBOOTH_SAVE_PAUSE"] = str(save_pause)
    backend = model.backend()
    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.randn(16, 8, 8, generator=generator), torch.randn(7, 64, generator=generator),
                        torch.randn(64, generator=generator), source=f"{i}.png") for i in range(4)]
    spec = LayerSpec.preset("attention", backend.dims, rank=4)
    lora = LoraSet(spec.targets(backend.dims), seed=0)
    trainer = Trainer(backend, lora, examples, TrainConfig(steps=TOTAL_STEPS, learning_rate=1e-3, ema_decay=0.99))
    run = checkpoints.RunFolder(folder)
    latest = run.latest()
    if latest is not None:
        trainer.load_state(checkpoints.load_state(latest))
    (folder / MARKER).write_text(str(trainer.step))  # not atomic on purpose: the driver only polls it
    end = TOTAL_STEPS if until is None else trainer.step + until
    while trainer.step < end:
        trainer.run(until=trainer.step + 1)
        state = {**trainer.state(), **checkpoints.describe(spec, backend.dims)}
        run.save(trainer.step, export.kohya_state_dict(trainer.result_lora()), {}, state, keep=2)


def fork_child(model: tiny.TinyFlux, folder: Path, until: int | None = None, save_pause: float = 0.0) -> int:
    (folder / MARKER).unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            train_child(model, folder, until, save_pause)
        except BaseException as e:  # noqa: BLE001 - reported through the exit code
            say(f"child failed: {type(e).__name__}: {e}", sys.stderr)
            code = 1
        os._exit(code)
    return pid


def say(line: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.002)
    return False


def newest_loads(folder: Path) -> int:
    """The newest checkpoint's step, after loading its state and LoRA file as a user would."""
    run = checkpoints.RunFolder(folder)
    newest = run.latest()
    state = checkpoints.load_state(newest)
    lora, _ = checkpoints.load_lora(newest)
    assert state["step"] == checkpoints.step_of(newest) and lora, newest
    assert all(torch.isfinite(t).all() for t in lora.values())
    return state["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder, rng = args.folder, random.Random(args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # built on one thread (no OpenMP pool to inherit), then shared with each child
    model = tiny.build(0, double_blocks=1, single_blocks=1)
    ok, inside_write, expected = 0, 0, None
    for trial in range(args.trials):
        targeted = trial % 2 == 1  # every other kill lands inside a checkpoint write
        pid = fork_child(model, folder, save_pause=0.03 if targeted else 0.0)
        marker = folder / MARKER
        resumed = wait_for(lambda: marker.is_file() and marker.read_text() != "", 120)
        resumed_from = int(marker.read_text()) if resumed else None
        if targeted:  # a temporary checkpoint folder exists: the write is under way
            wait_for(lambda: any(p.name.startswith(".tmp-") for p in (folder / "checkpoints").glob(".tmp-*")), 60)
            time.sleep(rng.uniform(0, 0.02))
        else:
            wait_for(lambda: checkpoints.RunFolder(folder).latest() is not None, 60)
            time.sleep(rng.uniform(0, 0.25))
        writing = any((folder / "checkpoints").glob(".tmp-*"))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        inside_write += writing
        try:
            step = newest_loads(folder)
            good = resumed_from == (expected or 0)  # this process resumed from the newest checkpoint before it
            expected = step
        except Exception as e:  # noqa: BLE001 - counted and shown
            say(f"trial {trial + 1}: newest checkpoint does not load: {e}")
            good = False
        ok += good
        say(f"trial {trial + 1}: resumed from {resumed_from}, killed {'inside a write' if writing else 'training'}"
            f", newest checkpoint step {expected}")
    pid = fork_child(model, folder, until=3)  # and a last process resumes and trains to the end
    _, status = os.waitpid(pid, 0)
    final_ok = os.waitstatus_to_exitcode(status) == 0 and newest_loads(folder) == (expected or 0) + 3
    say(f"{ok}/{args.trials} kills: newest checkpoint loaded and resumed ({inside_write} killed inside a "
        f"checkpoint write); final resume trained 3 more steps: {'ok' if final_ok else 'FAILED'}")
    return 0 if ok == args.trials and final_ok else 1


if __name__ == "__main__":
    sys.exit(main())
