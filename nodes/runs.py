"""Run folders: where checkpoints, samples and plots go, resuming, and picking a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comfy_api.latest import io

from ..trainer import checkpoints, export
from ..trainer.checkpoints import RunFolder
from . import host
from .types import CATEGORY, RunSettings

LATEST = "latest"


@dataclass(frozen=True)
class RunPlan:
    name: str = "flux_lora"
    save_every: int = 250
    keep_last: int = 4
    resume_from: str = ""
    plot_every: int = 50

    def folder_and_checkpoint(self) -> tuple[RunFolder, Path | None]:
        """The run folder to write into and the checkpoint to resume from (None: a fresh run)."""
        root = host.runs_root()
        resume = self.resume_from.strip()
        if not resume:
            return checkpoints.next_run_folder(root, self.name), None
        if resume == LATEST:
            found = checkpoints.latest_checkpoint(root, self.name)
            if found is None:
                raise ValueError(f"resume_from is 'latest' but no run called {self.name!r} has a checkpoint in "
                                 f"{root}; clear resume_from to start a fresh run.")
            return RunFolder(found.parent.parent), found
        path = export.safe_path(root, resume)
        found = RunFolder(path).latest() if (path / "checkpoints").is_dir() else path
        if found is None or not (found / checkpoints.STATE_FILE).is_file():
            raise ValueError(f"resume_from {resume!r} is not a checkpoint in {root}: use 'latest', a run folder "
                             "('flux_lora_001') or a checkpoint ('flux_lora_001/checkpoints/step_000250').")
        return RunFolder(found.parent.parent), found


class CheckpointSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxDreamBoothRun",
            display_name="Checkpoints & Resume",
            category=CATEGORY,
            description="Where a run keeps its checkpoints, samples and plots (output/flux_dreambooth/<run>), "
                        "how often it saves, and which checkpoint to resume from.",
            inputs=[
                io.String.Input("run_name", default="flux_lora",
                                tooltip="Each fresh run gets its own folder: run_name_001, run_name_002, …"),
                io.Int.Input("save_every_n_steps", default=250, min=1, max=100000,
                             tooltip="Save a checkpoint every this many steps (seed 002: 250), on Stop and "
                                     "Cancel, and at the end."),
                io.Int.Input("keep_last", default=4, min=0, max=1000,
                             tooltip="Keep only the newest checkpoints (seed 002's max_step_saves_to_keep: 8). "
                                     "0 keeps them all."),
                io.String.Input("resume_from", default="",
                                tooltip="Empty: start fresh. 'latest': continue the newest checkpoint of this "
                                        "run_name. Or a run folder ('flux_lora_001') or checkpoint "
                                        "('flux_lora_001/checkpoints/step_000250'). Resuming with the same "
                                        "settings gives the LoRA an uninterrupted run would."),
                io.Int.Input("plot_every_n_steps", default=50, min=1, max=100000,
                             tooltip="Redraw loss.png and the loss history every this many steps."),
            ],
            outputs=[RunSettings.Output(display_name="run")],
        )

    @classmethod
    def fingerprint_inputs(cls, run_name, resume_from, **_):
        """Resuming 'latest' again after a run has moved on must run again, not reuse the cache."""
        if not resume_from.strip():
            return ""
        try:
            _, found = RunPlan(run_name.strip(), resume_from=resume_from).folder_and_checkpoint()
        except ValueError as e:
            return str(e)
        return f"{found}:{(found / checkpoints.STATE_FILE).stat().st_mtime_ns}"

    @classmethod
    def execute(cls, run_name, save_every_n_steps, keep_last, resume_from, plot_every_n_steps) -> io.NodeOutput:
        name = run_name.strip()
        export.safe_path(host.runs_root(), name)  # a plain folder name inside output/flux_dreambooth
        if "/" in name.replace("\\", "/"):
            raise ValueError(f"run_name {run_name!r} must be a plain name (no '/'), e.g. 'sks_dog'.")
        return io.NodeOutput(RunPlan(name, save_every_n_steps, keep_last, resume_from, plot_every_n_steps))


def checkpoint_names() -> list[str]:
    root = host.runs_root()
    return [c.relative_to(root).as_posix() for run in checkpoints.runs(root) for c in run.checkpoints()]


class LoadCheckpointLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxDreamBoothLoadCheckpoint",
            display_name="Load Checkpoint LoRA",
            category=CATEGORY,
            description="The LoRA of one checkpoint of a run, to compare checkpoints and keep the best rather "
                        "than the last (seed 002 §6). Feed it to Apply FLUX LoRA or Save FLUX LoRA.",
            inputs=[io.Combo.Input("checkpoint", options=checkpoint_names() or ["(no checkpoints yet)"],
                                   tooltip="run/checkpoints/step_… under output/flux_dreambooth.")],
            outputs=[io.LoraModel.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        path = export.safe_path(host.runs_root(), checkpoint)
        return io.NodeOutput(checkpoints.load_trained_lora(path))
