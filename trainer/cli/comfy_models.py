"""FLUX.1 files loaded through ComfyUI's own loaders (what the stock Load Diffusion Model,
DualCLIPLoader (type flux) and Load VAE nodes do), for `train` on the command line: the model is
exactly the one the nodes train.

The command line's one boundary to ComfyUI: it is imported only when such a load is asked for
(models.py), and imports ComfyUI (from COMFYUI_PATH, or installed) only then. Training itself runs
on the library's ComfyFlux / ComfyText backends, as in the nodes."""

from __future__ import annotations

import inspect
import os
import sys

import torch

from ..data.encode import weights_fingerprint
from ..families.flux1.comfy import ComfyFlux
from ..families.flux1.comfy_text import ComfyText
from ..log import logger
from .weights import CLIP_L, T5, TRANSFORMER, VAE

log = logger(__name__)


def import_comfy():
    """ComfyUI's `comfy` package, from COMFYUI_PATH when set; on a machine without a GPU, in CPU mode."""
    path = os.environ.get("COMFYUI_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = comfy.cli_args.args.cpu or not torch.cuda.is_available()
    import comfy.model_base
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return comfy


class LoadingFlux(ComfyFlux):
    """ComfyFlux that puts the model on its device (as the Train node does) before each training run."""

    def __init__(self, patcher, comfy):
        mm = comfy.model_management
        super().__init__(patcher.model, patcher.load_device, training_flag=lambda on: setattr(mm, "in_training", on))
        self.patcher, self.comfy = patcher, comfy

    def load(self, *also) -> None:
        self.comfy.model_management.load_models_gpu([self.patcher, *also], force_full_load=True)

    def prepare(self) -> None:
        self.load()
        super().prepare()


class ComfyModel:
    """MODEL, CLIP and VAE as ComfyUI loaded them, with the tiny set's interface (train.py's)."""

    def __init__(self, patcher, clip, vae, name: str, comfy):
        self.patcher, self.clip, self.vae, self.name = patcher, clip, vae, name
        self._backend = LoadingFlux(patcher, comfy)

    def backend(self) -> LoadingFlux:
        return self._backend

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.permute(0, 2, 3, 1))  # ComfyUI images are (B, H, W, C)
        return self.patcher.model.process_latent_in(latents).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.patcher.model.process_latent_out(latents))
        return images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float().cpu().clamp(0, 1)

    @torch.no_grad()
    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
        return cond[0].float().cpu(), pooled[0].float().cpu()

    def identity(self) -> dict[str, str]:
        latent_format = type(self.patcher.model.latent_format).__name__
        return {"images": weights_fingerprint(self.vae.first_stage_model, latent_format),
                "text": weights_fingerprint(self.clip.cond_stage_model)}

    def trainable_text(self) -> ComfyText:
        return ComfyText(self.clip, lambda: self._backend.load(self.clip.patcher))


def _static(loader) -> dict:
    """ComfyUI >= 0.2x streams weights in per call on a GPU (dynamic VRAM); training needs them resident."""
    return {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(loader).parameters else {}


def load(plan, clip_options: dict | None = None, vae_config: dict | None = None) -> ComfyModel:
    """`clip_options`, `vae_config`: ComfyUI's text-encoder model_options and VAE config, for models of
    other widths than FLUX.1's (the tests' toy ones); ComfyUI reads real FLUX.1 files without them."""
    comfy = import_comfy()
    files = {part: str(w.path) for part, w in plan.parts.items()}
    log.info("Loading through ComfyUI: %s, %s + %s, %s.", files[TRANSFORMER], files[CLIP_L], files[T5], files[VAE])
    patcher = comfy.sd.load_diffusion_model(files[TRANSFORMER], **_static(comfy.sd.load_diffusion_model))
    found = type(getattr(patcher, "model", None))
    if found is not comfy.model_base.Flux:
        raise ValueError(f"--model {files[TRANSFORMER]}: ComfyUI loads it as {found.__name__}; expected FLUX.1 "
                         "(its Flux model).")
    clip = comfy.sd.load_clip(ckpt_paths=[files[CLIP_L], files[T5]], embedding_directory=None,
                              clip_type=comfy.sd.CLIPType.FLUX, model_options=dict(clip_options or {}),
                              **_static(comfy.sd.load_clip))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(files[VAE]), config=vae_config)
    return ComfyModel(patcher, clip, vae, plan.name, comfy)
