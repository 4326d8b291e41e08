"""Run folders: where checkpoints, samples and plots go, resuming, and picking a checkpoint."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer import files
from ..trainer.outputs import checkpoints, scores
from ..trainer.outputs.checkpoints import RunSettings
from . import ids, sockets
from .host import paths


class RunSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.RUN,
            display_name="Checkpoints & Resume",
            category=sockets.Category.TRAINING,
            description="Where a run keeps its checkpoints, samples and plots (output/flux_dreambooth/<run>), "
                        "how often it saves, and which checkpoint to resume from.",
            inputs=[
                io.String.Input("run_name", default="flux_lora",
                                tooltip="Each fresh run gets its own folder: run_name_001, run_name_002, …"),
                io.Int.Input("save_every_n_steps", default=250, min=1, max=100000,
                             tooltip="Save a checkpoint every this many steps (ai-toolkit's save_every, often "
                                     "250), on Stop and Cancel, and at the end."),
                io.Int.Input("keep_last", default=4, min=0, max=1000,
                             tooltip="Keep only the newest checkpoints (ai-toolkit's max_step_saves_to_keep). "
                                     "0 keeps them all."),
                io.String.Input("resume_from", default="",
                                tooltip="Empty: start fresh. 'latest': continue the newest checkpoint of this "
                                        "run_name. Or a run folder ('flux_lora_001') or checkpoint "
                                        "('flux_lora_001/checkpoints/step_000250'). Resuming with the same "
                                        "settings gives the LoRA an uninterrupted run would."),
                io.Int.Input("plot_every_n_steps", default=50, min=1, max=100000,
                             tooltip="Redraw loss.png and the loss history every this many steps."),
            ],
            outputs=[sockets.RunSettings.Output(display_name="run")],
        )

    @classmethod
    def fingerprint_inputs(cls, run_name, resume_from, **_):
        """Resuming 'latest' again after a run has moved on must run again, not reuse the cache."""
        if not resume_from.strip():
            return ""
        try:
            _, found = RunSettings(run_name.strip(), resume_from=resume_from).folder_and_checkpoint(paths.runs_root())
        except ValueError as e:
            return str(e)
        return f"{found}:{(found / checkpoints.STATE_FILE).stat().st_mtime_ns}"

    @classmethod
    def execute(cls, run_name, save_every_n_steps, keep_last, resume_from, plot_every_n_steps) -> io.NodeOutput:
        name = run_name.strip()
        files.safe_path(paths.runs_root(), name)  # a plain folder name inside output/flux_dreambooth
        if "/" in name.replace("\\", "/"):
            raise ValueError(f"run_name {run_name!r} must be a plain name (no '/'), e.g. 'sks_dog'.")
        return io.NodeOutput(RunSettings(name, save_every_n_steps, keep_last, resume_from, plot_every_n_steps))


def checkpoint_names() -> list[str]:
    root = paths.runs_root()
    return [c.relative_to(root).as_posix() for run in checkpoints.runs(root) for c in run.checkpoints()]


def best_checkpoint(names: list[str]) -> str | None:
    """The best checkpoint (scores.json's, outputs/scores.py) of the most recently scored run, if it is kept."""
    root = paths.runs_root()
    scored = [run.path for run in checkpoints.runs(root) if (run.path / scores.SCORES_JSON).is_file()]
    for folder in sorted(scored, key=lambda p: (p / scores.SCORES_JSON).stat().st_mtime_ns, reverse=True):
        step = scores.best_step(folder)
        name = f"{folder.name}/checkpoints/step_{step:06d}" if step is not None else None
        if name in names:
            return name
    return None


class LoadCheckpointLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = checkpoint_names() or ["(no checkpoints yet)"]
        return io.Schema(
            node_id=ids.LOAD_CHECKPOINT,
            display_name="Load Checkpoint LoRA",
            category=sockets.Category.LORA,
            description="The LoRA of one checkpoint of a run, to compare checkpoints and keep the best rather "
                        "than the last. Feed it to Apply FLUX LoRA or Save FLUX LoRA.",
            inputs=[io.Combo.Input("checkpoint", options=names, default=best_checkpoint(names) or names[0],
                                   tooltip="run/checkpoints/step_… under output/flux_dreambooth. Starts at the best "
                                           "checkpoint of the newest run that was scored (Validation Samples with a "
                                           "CLIP_VISION): the highest likeness among those with drift at most "
                                           "max_drift.")],
            outputs=[io.LoraModel.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        path = files.safe_path(paths.runs_root(), checkpoint)
        return io.NodeOutput(checkpoints.load_trained_lora(path))
