"""Run folders and checkpoints.

A run lives in one folder; each checkpoint is a subfolder `checkpoints/step_000250/` holding

    lora.safetensors   the LoRA as trained so far, a file ComfyUI's LoraLoader accepts
    state.pt           what resuming needs: step, RNG, batch order, optimizer, schedule, EMA

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash or a
kill during a save never leaves a half-written checkpoint where the last good one is found, and
only the newest `keep` are kept: newest by when they were written, so a run resumed from an
earlier checkpoint keeps what it writes (not the abandoned branch's higher steps). A checkpoint
with a non-finite weight is never written.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import families, files
from ..lora.targets import LayerSpec, LoraTarget
from ..lora.text_encoder import TEXT_COMPONENTS
from ..lora.weights import LoraSet
from . import export

LORA_FILE, STATE_FILE = "lora.safetensors", "state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass(frozen=True)
class RunSettings:
    """Where a run keeps its files and how often: the Checkpoints & Resume node's settings."""

    name: str = "flux_lora"  # run folders are name_001, name_002, …
    save_every: int = 250  # a checkpoint every this many steps (and at the end, on Stop and Cancel)
    keep_last: int = 4  # newest checkpoints kept; 0 keeps all
    resume_from: str = ""  # "", "latest", a run folder or a checkpoint folder, relative to the runs root
    plot_every: int = 50  # loss plot and history rewritten every this many steps

    def folder_and_checkpoint(self, root: Path) -> tuple["RunFolder", Path | None]:
        """The run folder to write into and the checkpoint to resume from (None: a fresh run)."""
        resume = self.resume_from.strip()
        if not resume:
            return next_run_folder(root, self.name), None
        files.safe_path(root, self.name)
        if resume == LATEST:
            found = latest_checkpoint(root, self.name)
            if found is None:
                raise ValueError(f"resume_from is 'latest' but no run called {self.name!r} has a checkpoint in "
                                 f"{root}; clear resume_from to start a fresh run.")
            return RunFolder(found.parent.parent), found
        path = files.safe_path(root, resume)
        found = RunFolder(path).latest() if (path / "checkpoints").is_dir() else path
        if found is None or not (found / STATE_FILE).is_file():
            raise ValueError(f"resume_from {resume!r} is not a checkpoint in {root}: use 'latest', a run folder "
                             "('flux_lora_001') or a checkpoint ('flux_lora_001/checkpoints/step_000250').")
        return RunFolder(found.parent.parent), found


class RunFolder:
    """A run's folder. With `root`, `path` is a name inside it, checked like every name the pack
    writes (no `..`, no absolute path, no link out of the root: files.safe_path)."""

    def __init__(self, path: str | Path, root: str | Path | None = None):
        self.path = files.safe_path(root, str(path)) if root is not None else Path(path)
        self.checkpoint_dir = self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, in the order they were written (oldest first; same time: by step)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.iterdir()
                 if _STEP_DIR.match(p.name) and (p / LORA_FILE).is_file() and (p / STATE_FILE).is_file()]
        return sorted(found, key=_written)

    def check_writable(self, need_bytes: int = 0) -> None:
        """Before training: the run folder can be created and written, with `need_bytes` free."""
        files.check_writable(self.path, need_bytes, "The run folder")

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, lora_sd: dict[str, torch.Tensor], meta: dict[str, str], state: dict,
             keep: int = 0) -> Path:
        """Write checkpoint `step` atomically; then keep only the newest `keep` (0: keep all).
        An existing checkpoint of the same step (a run resumed from an earlier one) is replaced.
        Refuses (FloatingPointError) a LoRA or state with a NaN or inf: the last good one stays latest."""
        bad = _non_finite({**lora_sd, **_tensors(state.get("lora")), **_tensors(state.get("ema"), "ema")})
        if bad:
            raise FloatingPointError(f"Not saving checkpoint step {step}: {bad} has NaN or inf values. The last "
                                     f"good checkpoint ({self.latest() or 'none yet'}) is kept; resume from it with "
                                     "a lower learning_rate.")
        final = self.checkpoint_dir / f"step_{step:06d}"
        tmp = self.checkpoint_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with files.reporting_disk_full(tmp):
                tmp.mkdir(parents=True)
            files.write_synced(tmp / LORA_FILE, lambda p: save_file(lora_sd, p, metadata=meta))
            files.write_synced(tmp / STATE_FILE, lambda p: torch.save(state, p))
            self._stamp_newest(tmp / STATE_FILE)
            files.sync_folder(tmp)
            _pause_for_tests()
            if final.exists():  # swap: the old one stays whole until the new one is in place
                old = self.checkpoint_dir / f".old-{final.name}-{os.getpid()}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            files.sync_folder(self.checkpoint_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._sweep(keep)
        return final

    def _stamp_newest(self, state_file: Path) -> None:
        """Write order is the state file's time: make it later than every other checkpoint's, even
        when two saves fall in one tick of the file system's clock."""
        newest = max((_written(c)[0] for c in self.checkpoints()), default=0)
        written = state_file.stat().st_mtime_ns
        if written <= newest:
            os.utime(state_file, ns=(newest + 1_000_000,) * 2)  # 1 ms: what most file systems keep

    def _sweep(self, keep: int) -> None:
        """Drop checkpoints beyond the newest `keep`, and leftovers of interrupted saves."""
        for leftover in [*self.checkpoint_dir.glob(".tmp-*"), *self.checkpoint_dir.glob(".old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        if keep > 0:
            for old in self.checkpoints()[:-keep]:  # renamed first: a kill mid-delete leaves a leftover, swept later
                gone = self.checkpoint_dir / f".old-{old.name}-{os.getpid()}"
                old.rename(gone)
                shutil.rmtree(gone)


def _written(checkpoint: Path) -> tuple[int, int]:
    return (checkpoint / STATE_FILE).stat().st_mtime_ns, step_of(checkpoint)


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, dict):
        return {f"{prefix}{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)}
    if isinstance(value, (list, tuple)):
        return {f"{prefix}[{i}]": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)}
    return {}


def _non_finite(tensors: dict[str, torch.Tensor]) -> str:
    """The first tensor with a NaN or inf ('' if none)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return ""


def _pause_for_tests() -> None:
    """FLUX_DREAMBOOTH_SAVE_PAUSE=seconds: sleep between writing a checkpoint and renaming it into
    place, so the fault tests can kill a process inside a checkpoint write."""
    pause = os.environ.get("FLUX_DREAMBOOTH_SAVE_PAUSE")
    if pause:
        time.sleep(float(pause))


def checkpoint_bytes(lora_parameters: int, ema: bool) -> int:
    """About what one checkpoint takes on disk (fp32): the LoRA file, and a state with the LoRA,
    AdamW's two moments and the EMA."""
    return 4 * lora_parameters * (1 + 1 + 2 + (1 if ema else 0)) + (1 << 20)


def step_of(checkpoint: Path) -> int:
    match = _STEP_DIR.match(Path(checkpoint).name)
    if not match:
        raise ValueError(f"{checkpoint} is not a checkpoint folder (step_000250 and the like).")
    return int(match.group(1))


def load_state(checkpoint: str | Path) -> dict:
    """The training state of a checkpoint folder, loaded without running any pickled code."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {STATE_FILE}; pick a folder like "
                                ".../checkpoints/step_000250 (or 'latest').")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lora(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's LoRA file (kohya format) and its metadata."""
    path = Path(checkpoint) / LORA_FILE
    return export.load(path), export.read_metadata(path)


def next_run_folder(root: str | Path, name: str) -> RunFolder:
    """`root/name_001`, `root/name_002`, …: a fresh folder per run, so runs never mix."""
    files.safe_path(root, name)
    if "/" in name.replace("\\", "/"):
        raise ValueError(f"The run name {name!r} must be a plain name (no '/'), e.g. 'sks_dog'.")
    taken = [int(run.path.name.rsplit("_", 1)[1]) for run in runs(root, name)]
    return RunFolder(f"{name.strip()}_{max(taken, default=0) + 1:03d}", root)


def runs(root: str | Path, name: str = "*") -> list[RunFolder]:
    """The run folders under `root` (of runs called `name`), by name; a link out of `root` is not one."""
    pattern = re.compile(r".+_\d+" if name == "*" else rf"{re.escape(name.strip())}_\d+")
    inside = Path(root).resolve()
    return [RunFolder(p) for p in sorted(Path(root).glob("*"))
            if p.is_dir() and pattern.fullmatch(p.name) and p.resolve().parent == inside]


def latest_checkpoint(root: str | Path, name: str) -> Path | None:
    """The most recently written checkpoint of the runs called `name` (SimpleTuner's
    resume_from_checkpoint 'latest')."""
    found = [c for run in runs(root, name) for c in run.checkpoints()]
    return max(found, key=_written, default=None)


def describe(spec: LayerSpec, dims, lora: LoraSet | None = None) -> dict:
    """What a checkpoint records besides the trainer's state, to rebuild its LoRA on its own: the
    model family, the transformer's layer selection and sizes (`dims`, the family's layout), and the
    text-encoder targets of `lora` (if any)."""
    text = [asdict(w.target) for w in lora.part(*TEXT_COMPONENTS)] if lora is not None else []
    return {"family": families.of_layout(dims).name, "spec": spec.to_json(), "dims": list(astuple(dims)),
            "text_targets": text}


def family_of(state: dict) -> families.Family:
    """The family a checkpoint trained (checkpoints from before families: FLUX.1)."""
    return families.family(state.get("family", "flux1"))


def check_family(state: dict, family: families.Family, checkpoint: str | Path = "The checkpoint") -> None:
    """A checkpoint resumes only on a model of the family it trained."""
    saved = family_of(state)
    if saved != family:
        raise ValueError(f"{checkpoint} trained a {saved.label} LoRA, but the MODEL is {family.label}: load the "
                         f"{saved.label} model it trained on to resume it, or clear resume_from to start a fresh run.")


def load_trained_lora(checkpoint: str | Path) -> export.TrainedLora:
    """A checkpoint's LoRA (its EMA or schedule-free average when the run kept one), ready to apply
    or save in any format. Its kohya form is the checkpoint's file itself, as written while the
    model was at hand (DoRA's dora_scale is relative to the base weights)."""
    state = load_state(checkpoint)
    targets = LayerSpec.from_json(state["spec"]).targets(family_of(state).layout(*state["dims"]))
    targets += [LoraTarget(**{**t, "rows": tuple(t["rows"])}) for t in state.get("text_targets", [])]
    dtype = next(iter(state["lora"].values())).dtype
    lora = LoraSet(targets, dtype)
    lora.load_state_dict(state["lora"])
    if state.get("ema") or state.get("eval_weights"):  # the EMA, or a schedule-free optimizer's average
        lora.copy_from(state.get("ema") or state["eval_weights"])
    kohya, meta = load_lora(checkpoint)
    return export.TrainedLora(lora, meta, kohya)
