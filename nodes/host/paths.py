"""ComfyUI's folders: where inputs are read, run folders and LoRA files written, models found."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ...trainer.data.datasets import DatasetError

PACK_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_DATASETS = {"builtin:quickstart": PACK_ROOT / "trainer" / "assets" / "quickstart",
                    # edit pairs (FLUX.1 Kontext): shapes recoloured red, and the shapes before the edit
                    "builtin:kontext": PACK_ROOT / "trainer" / "assets" / "kontext" / "targets",
                    "builtin:kontext_controls": PACK_ROOT / "trainer" / "assets" / "kontext" / "controls"}
RUNS_SUBFOLDER = "flux_dreambooth"
VLM_FOLDERS = ("vlm", "LLM")  # models/vlm, and models/LLM where other caption packs keep them


def resolve_input_path(text: str, what: str) -> Path:
    """An absolute path, a path relative to ComfyUI's input folder, or a built-in dataset."""
    text = text.strip()
    if text in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[text]
    if not text:
        raise DatasetError(f"{what} is empty; give a path (absolute, or relative to ComfyUI's input folder).")
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


def input_root() -> Path:
    """ComfyUI's input folder: where pasted configs' relative paths start."""
    return Path(folder_paths.get_input_directory())


def runs_root() -> Path:
    """Where run folders (checkpoints, samples, plots) go: ComfyUI's output folder."""
    return (Path(folder_paths.get_output_directory()) / RUNS_SUBFOLDER).resolve()


def output_reference(path: Path) -> dict:
    """A file under the output folder as ComfyUI's UI and /view address it."""
    rel = Path(path).resolve().relative_to(Path(folder_paths.get_output_directory()).resolve())
    return {"filename": rel.name, "subfolder": rel.parent.as_posix() if rel.parent != Path(".") else "",
            "type": "output"}


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_files() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_file(name: str) -> Path:
    return Path(folder_paths.get_full_path_or_raise("loras", name))


def vlm_models() -> list[str]:
    """Transformers model folders (with a config.json) under models/vlm or models/LLM."""
    root = Path(folder_paths.models_dir)
    return [p.parent.relative_to(root).as_posix() for name in VLM_FOLDERS if (root / name).is_dir()
            for p in sorted((root / name).rglob("config.json"))]


def vlm_path(name: str) -> Path:
    path = (Path(folder_paths.models_dir) / name).resolve()
    if not any(path.is_relative_to((Path(folder_paths.models_dir) / f).resolve()) for f in VLM_FOLDERS):
        raise ValueError(f"model {name!r} is not a folder under models/vlm or models/LLM.")
    return path
