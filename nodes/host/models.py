"""The workflow's MODEL, CLIP and VAE: a training backend on the MODEL, loading it for training,
encoding with the CLIP and VAE, ComfyUI's model memory, and its Cancel."""

from __future__ import annotations

import gc

import comfy.model_base
import comfy.model_management
import torch

from ...trainer.data.encode import weights_fingerprint
from ...trainer.families.flux1.comfy import ComfyFlux


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


def check_cancel() -> None:
    """Raise ComfyUI's interrupt exception if Cancel was pressed (it clears the flag)."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def is_cancel(error: BaseException) -> bool:
    return isinstance(error, comfy.model_management.InterruptProcessingException)


def release_memory() -> None:
    """Give back cached GPU memory after a job (ComfyUI lives on)."""
    gc.collect()
    comfy.model_management.soft_empty_cache()


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
