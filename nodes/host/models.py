"""The workflow's MODEL, CLIP and VAE: a training backend on the MODEL, loading it for training,
encoding with the CLIP and VAE, ComfyUI's model memory, and its Cancel."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Sequence

import comfy.model_base
import comfy.model_management
import comfy.patcher_extension
import torch

from ...trainer.data.encode import weights_fingerprint
from ...trainer.families.chroma.comfy import ComfyChroma
from ...trainer.families.flux1.comfy import ComfyFlux
from ...trainer.families.flux1.comfy_text import ComfyText
from ...trainer.families.flux2.comfy import ComfyFlux2
from ...trainer.log import logger
from ...trainer.loop import quantize
from . import gguf

log = logger(__name__)


def set_training_kernels(on: bool) -> None:
    """ComfyUI picks autograd-friendly kernels (e.g. RoPE) while this flag is set."""
    comfy.model_management.in_training = on


def flux_backend(model) -> tuple[ComfyFlux, object]:
    """A training backend on the workflow's MODEL, and the patcher to load before training.

    With dynamic VRAM (ComfyUI ≥ 0.2x on a GPU) weights are streamed in per call; training needs
    them resident, so it runs on a non-dynamic clone of the same model, as ComfyUI's own trainer
    does. Nothing is loaded here: call `load_for_training` once the dataset is encoded."""
    kind = type(model.model).__name__
    if kind in REFUSED:
        raise ValueError(f"The MODEL input is {REFUSED[kind]}")
    backend = BACKENDS.get(kind) if isinstance(model.model, comfy.model_base.Flux) else None
    if backend is None:
        raise ValueError(f"The MODEL input is a {kind}; this node trains FLUX.1, FLUX.2 and Chroma "
                         "models (load one with 'Load Diffusion Model' or the Tiny FLUX loader).")
    patcher = model.clone(disable_dynamic=True) if getattr(model, "is_dynamic", lambda: False)() else model
    trained = backend(patcher.model, patcher.load_device, training_flag=set_training_kernels)
    if trained.family.name == "flux2" and trained.variant == "klein":
        log.warning("FLUX.2 [klein]: train on the base weights. Base and distilled klein have the same keys, so this "
                    "can't tell which was loaded; LoRAs trained on distilled klein give grey, washed-out images.")
    return trained, patcher


# ComfyUI's model class (model_base) -> the backend of its family
BACKENDS = {"Flux": ComfyFlux, "Flux2": ComfyFlux2, "Chroma": ComfyChroma}
# FLUX-like model classes this pack does not train, and why
REFUSED = {"ChromaRadiance": "Chroma Radiance, which works in pixel space (no VAE latents, its own NeRF decoder "
                             "head); this node trains latent models. Train Chroma (Chroma1-Base / HD) instead."}


def reads_pooled(model) -> bool:
    """Whether the MODEL's family reads a pooled text vector (FLUX.1's CLIP-L; FLUX.2 none)."""
    backend = BACKENDS.get(type(model.model).__name__)
    return backend is None or backend.family.pooled


def load_for_training(patcher, keep_off: Sequence[str] = (), again: bool = False, also: Sequence = ()) -> None:
    """Put the model, with any LoRAs already applied to it, on its device, all but the blocks in
    `keep_off` (block swap's, e.g. 'single_blocks.37'): those stay in CPU memory, with the same
    LoRAs applied there, and never reach the device, so a model larger than the card can train.
    `again`: after a render, put back what ComfyUI may have moved off meanwhile. `also`: patchers
    loaded in the same call (a CLIP that trains too), so that loading one never unloads the other."""
    if not keep_off:
        comfy.model_management.load_models_gpu([patcher, *also], force_full_load=True)
        return
    dit = patcher.model.diffusion_model
    kept = {name: dit.get_submodule(name) for name in keep_off}
    patcher.model_size()  # measured (and remembered by ComfyUI) with every block in place
    if not again:
        _unload_model(patcher.model)  # loaded whole earlier: everything back to the CPU first
        for name, block in kept.items():
            if any(t.device != patcher.offload_device for t in [*block.parameters(), *block.buffers()]):
                block.to(patcher.offload_device)
            for key in [k for k in patcher.patches if k.startswith(f"diffusion_model.{name}.")]:
                patcher.patch_weight_to_device(key, device_to=patcher.offload_device)  # undone at unload
    with _out_of_sight(dit, keep_off):
        comfy.model_management.load_models_gpu([patcher, *also], force_full_load=True)
    # ComfyUI counts a whole load as the whole model: tell it what is on the device
    on = patcher.model_size() - sum(t.nbytes for block in kept.values() for t in block.state_dict().values())
    patcher.model.model_loaded_weight_memory = min(patcher.model.model_loaded_weight_memory, on)


@contextmanager
def _out_of_sight(dit, names: Sequence[str]):
    """The named blocks out of the model's tree (an empty module in each one's place) while
    ComfyUI loads it: its loader moves and patches only what it finds."""
    taken = []
    try:
        for name in names:
            kind, index = name.rsplit(".", 1)
            blocks = dit.get_submodule(kind)
            taken.append((blocks, int(index), blocks[int(index)]))
            blocks[int(index)] = torch.nn.Module()
        yield
    finally:
        for blocks, index, block in taken:
            blocks[index] = block


def _unload_model(base_model) -> None:
    """Unload every patcher of `base_model` ComfyUI has loaded (its weights go back to the CPU)."""
    mm = comfy.model_management
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.model is base_model and loaded.model_unload():
            mm.current_loaded_models.pop(i)


def sampling_as_loaded(patcher):
    """A clone of `patcher` that ComfyUI's sampler runs as it is, without loading it: for renders
    during a block-swap run, whose swapped blocks stream in from the CPU as they do in training
    (the LoRA is on the activations meanwhile, not merged into the weights)."""
    clone = patcher.clone()

    def loaded_already(_executor, model, _noise_shape, conds, *args, **kwargs):
        return model.model, conds, []

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "flux_dreambooth",
                               loaded_already)
    return clone


def trainable_text(clip, patcher, keep_off: Sequence[str] = ()) -> ComfyText:
    """The workflow's CLIP as text encoders a run trains (text_encoder_lr > 0); whenever the run needs
    them on the device they are loaded together with the transformer `patcher`."""
    if not reads_pooled(patcher):
        raise ValueError("text_encoder_lr is above 0, but training the text encoder is for FLUX.1's CLIP-L and "
                         "T5 only; FLUX.2's Qwen3 / Mistral encoder and Chroma's T5 stay frozen. Set text_encoder_lr "
                         "to 0.")
    return ComfyText(clip, lambda: load_for_training(patcher, keep_off, again=True, also=(clip.patcher,)))


class ComfyEncoders:
    """The trainer's Encoders protocol on the workflow's own VAE and CLIP."""

    def __init__(self, model, clip, vae):
        self.model, self.clip, self.vae = model, clip, vae

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.permute(0, 2, 3, 1))  # ComfyUI images are (B, H, W, C)
        return self.model.model.process_latent_in(latents)

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
        return cond[0], pooled[0] if reads_pooled(self.model) and pooled is not None else None

    def identity(self) -> dict[str, str]:
        """The encoders' weights (and any LoRA patched onto them), and the latent normalisation."""
        def patches(patcher):
            return patcher.patches_uuid if patcher.patches else "no patches"

        latent_format = type(self.model.model.latent_format).__name__
        vae = weights_fingerprint(self.vae.first_stage_model, f"{latent_format}{patches(self.vae.patcher)}")
        pooled = "pooled" if reads_pooled(self.model) else "no pooled"  # Chroma's T5 alone, not FLUX.1's pair
        return {"images": vae,
                "text": weights_fingerprint(self.clip.cond_stage_model, f"{pooled}{patches(self.clip.patcher)}")}

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
    """How the model's weights are stored ('fp8_e4m3fn' from the UNET loader's fp8 setting, 'GGUF
    Q4_K' from ComfyUI-GGUF's loader)."""
    from_gguf = gguf.quantization(model)
    if from_gguf:
        return from_gguf
    dtype = model.model.get_dtype()
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_base_quantization(model, mode: str) -> None:
    """Before anything is encoded: int8 is for a MODEL in bf16, fp16 or fp32."""
    quantize.check(mode)
    stored = gguf.quantization(model) or (weight_dtype_name(model) if model.model.get_dtype() not in
                                          quantize.QUANTIZABLE_DTYPES else None)
    if mode != "none" and stored:
        raise ValueError(f"base_quantization is {mode}, but this MODEL's weights are {stored} already: they are "
                         "as small as int8 or smaller. Set base_quantization to none to train on them as they are.")


@contextmanager
def quantized_base(patcher, backend: ComfyFlux, mode: str):
    """While inside, the MODEL's block weights are `mode` (int8, see trainer/loop/quantize.py):
    made from the weights where ComfyUI keeps them when unloaded (the CPU), one layer at a time on
    the device, before `load_for_training` loads the rest. Afterwards the model is unloaded and
    gets its original weights back, so the workflow's MODEL is unchanged. Layers a LoRA is patched
    onto in the workflow (a LoRA loader before Train) and layers ComfyUI streams in per call stay
    as they are."""
    check_base_quantization(patcher, mode)
    if mode == "none":
        yield None
        return
    patched = set(patcher.patches)
    _unload_model(patcher.model)  # the originals stay in CPU memory, off the device

    def keep(name, layer) -> bool:
        return f"diffusion_model.{name}.weight" not in patched and not hasattr(layer, "_v")

    with quantize.quantized_base(backend, mode, keep) as quantized:
        try:
            yield quantized
        finally:
            _unload_model(patcher.model)  # the int8 weights leave the device before the originals return


MODEL_FILE_INPUTS = ("unet_name", "ckpt_name", "model_name")  # UNETLoader, CheckpointLoaderSimple, GGUF / NF4 loaders
LORA_FILE_INPUTS = ("lora_name",)


def loaded_from(prompt: dict | None, node_id: str, input_name: str = "model") -> tuple[str, list[str]]:
    """The model file behind input `input_name` of node `node_id` in the running prompt (ComfyUI's
    hidden PROMPT), followed up its MODEL links through LoRA loaders and patches; and the LoRA files
    applied on the way. ("", []) when the chain ends at no file (a model made in memory)."""
    loras, node, seen = [], (prompt or {}).get(str(node_id)), set()
    link = node and node.get("inputs", {}).get(input_name)
    while isinstance(link, list) and link and str(link[0]) not in seen:
        seen.add(str(link[0]))
        node = (prompt or {}).get(str(link[0]))
        if not isinstance(node, dict):
            break
        inputs = node.get("inputs", {})
        loras += [inputs[k] for k in LORA_FILE_INPUTS if isinstance(inputs.get(k), str)]
        for key in MODEL_FILE_INPUTS:
            if isinstance(inputs.get(key), str):
                return inputs[key], loras[::-1]
        link = inputs.get("model")
    return "", loras[::-1]
