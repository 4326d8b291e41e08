"""Everything that touches ComfyUI's internals, in one place: model loading, encoding with the
workflow's CLIP and VAE, applying a LoRA the way the stock LoraLoader does, and its folders."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_base
import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..trainer.backends.comfy_flux import ComfyFlux
from ..trainer.cache import weights_fingerprint
from ..trainer.data import DatasetError

log = logging.getLogger("flux_dreambooth")

BUILTIN_DATASETS = {"builtin:quickstart": Path(__file__).resolve().parent.parent / "trainer" / "assets" / "quickstart"}


def set_training_kernels(on: bool) -> None:
    """ComfyUI picks autograd-friendly kernels (e.g. RoPE) while this flag is set."""
    comfy.model_management.in_training = on


def flux_backend(model) -> tuple[ComfyFlux, object]:
    """A training backend on the workflow's MODEL, and the patcher to load before training.

    With dynamic VRAM (ComfyUI ≥ 0.2x on a GPU) weights are streamed in per call; training needs
    them resident, so it runs on a non-dynamic clone of the same model, as ComfyUI's own trainer
    does. Nothing is loaded here: call `load_for_training` once the dataset is encoded."""
    if not isinstance(model.model, comfy.model_base.Flux) or type(model.model).__name__ != "Flux":
        raise ValueError(f"The MODEL input is a {type(model.model).__name__}; this node trains FLUX.1 models "
                         "(load one with 'Load Diffusion Model' or the Tiny FLUX loader).")
    patcher = model.clone(disable_dynamic=True) if getattr(model, "is_dynamic", lambda: False)() else model
    return ComfyFlux(patcher.model, patcher.load_device, training_flag=set_training_kernels), patcher


def load_for_training(patcher) -> None:
    """Put the whole model, with any LoRAs already applied to it, on its device."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)


class ComfyEncoders:
    """The trainer's Encoders protocol on the workflow's own VAE and CLIP."""

    def __init__(self, model, clip, vae):
        self.model, self.clip, self.vae = model, clip, vae

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.permute(0, 2, 3, 1))  # ComfyUI images are (B, H, W, C)
        return self.model.model.process_latent_in(latents)

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
        return cond[0], pooled[0]

    def identity(self) -> dict[str, str]:
        """The encoders' weights (and any LoRA patched onto them), and the latent normalisation."""
        def patches(patcher):
            return patcher.patches_uuid if patcher.patches else "no patches"

        latent_format = type(self.model.model.latent_format).__name__
        vae = weights_fingerprint(self.vae.first_stage_model, f"{latent_format}{patches(self.vae.patcher)}")
        return {"images": vae,
                "text": weights_fingerprint(self.clip.cond_stage_model, patches(self.clip.patcher))}

    def release(self) -> None:
        unload(self.clip.patcher, self.vae.patcher)


def unload(*patchers) -> None:
    """Take these models off their device now; ComfyUI loads them again when next needed."""
    mm = comfy.model_management
    wanted = {id(p) for p in patchers}
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if id(loaded.model) in wanted and loaded.model_unload():
            mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()


def apply_lora(model, lora_sd: dict, strength: float):
    """What the stock LoraLoader does with a file, for a state dict."""
    return comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)[0]


def load_lora_file(name: str) -> dict:
    return comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name), safe_load=True)


def lora_files() -> list[str]:
    return folder_paths.get_filename_list("loras")


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def resolve_input_path(text: str, what: str) -> Path:
    """An absolute path, a path relative to ComfyUI's input folder, or a built-in dataset."""
    text = text.strip()
    if text in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[text]
    if not text:
        raise DatasetError(f"{what} is empty; give a path (absolute, or relative to ComfyUI's input folder).")
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


RUNS_SUBFOLDER = "flux_dreambooth"


def runs_root() -> Path:
    """Where run folders (checkpoints, samples, plots) go: ComfyUI's output folder."""
    return (Path(folder_paths.get_output_directory()) / RUNS_SUBFOLDER).resolve()


def output_reference(path: Path) -> dict:
    """A file under the output folder as ComfyUI's UI and /view address it."""
    rel = Path(path).resolve().relative_to(Path(folder_paths.get_output_directory()).resolve())
    return {"filename": rel.name, "subfolder": rel.parent.as_posix() if rel.parent != Path(".") else "",
            "type": "output"}


def send_event(event: str, data: dict) -> None:
    """A websocket message to every connected browser (safe from any thread)."""
    server = getattr(prompt_server(), "instance", None)
    if server is not None:
        server.send_sync(event, data)


def prompt_server():
    try:
        from server import PromptServer
    except ImportError:  # no web server in this process (a script or a test harness)
        return None
    return PromptServer


VLM_FOLDERS = ("vlm", "LLM")  # models/vlm, and models/LLM where other caption packs keep them


def vlm_models() -> list[str]:
    """Transformers model folders (with a config.json) under models/vlm or models/LLM."""
    root = Path(folder_paths.models_dir)
    found = [p.parent.relative_to(root).as_posix() for name in VLM_FOLDERS if (root / name).is_dir()
             for p in sorted((root / name).rglob("config.json"))]
    return found


def vlm_path(name: str) -> Path:
    path = (Path(folder_paths.models_dir) / name).resolve()
    if not any(path.is_relative_to((Path(folder_paths.models_dir) / f).resolve()) for f in VLM_FOLDERS):
        raise ValueError(f"model {name!r} is not a folder under models/vlm or models/LLM.")
    return path


def torch_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    device = comfy.model_management.get_torch_device()
    if device.type == "cuda":
        return device, torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return device, torch.float32


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}


def weight_dtype_name(model) -> str:
    """How the model's weights are stored ('fp8_e4m3fn' from the UNET loader's fp8 setting)."""
    dtype = model.model.get_dtype()
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
