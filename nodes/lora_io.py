"""Apply a LoRA to a MODEL, save one into models/loras, and the tiny FLUX loader."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer import files
from ..trainer.families import flux2
from ..trainer.log import logger
from ..trainer.outputs import export
from ..trainer.recipe.schema import SaveSection
from . import ids, sockets
from .host import loras, paths
from .host.tiny import TINY_FAMILIES, WEIGHT_DTYPES

log = logger(__name__)
NO_FILE = "(none)"


class ApplyFluxLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.APPLY,
            display_name="Apply FLUX LoRA",
            category=sockets.Category.LORA,
            description="MODEL + LoRA → MODEL, exactly as the stock Load LoRA node applies a file. Takes the "
                        "Train node's LoRA, a file from models/loras, or both.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model to apply the LoRA to (the one it was trained on)."),
                io.LoraModel.Input("lora", optional=True, tooltip="A LoRA from the Train node."),
                io.Combo.Input("lora_name", options=[NO_FILE] + paths.lora_files(), default=NO_FILE,
                               tooltip="A LoRA file from models/loras (for example one this pack saved)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="1.0 is as trained. 0.7–0.9 loosens an overfit LoRA; above 1 exaggerates."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, lora=None) -> io.NodeOutput:
        if lora is None and lora_name == NO_FILE:
            raise ValueError("Apply FLUX LoRA has nothing to apply: connect `lora` from the Train node or pick "
                             "a file in `lora_name`.")
        if lora is not None:
            model = loras.apply_lora(model, lora, strength)
        if lora_name != NO_FILE:
            model = loras.apply_lora(model, loras.load_lora_file(lora_name), strength)
        return io.NodeOutput(model)


class SaveFluxLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.SAVE,
            display_name="Save FLUX LoRA",
            category=sockets.Category.LORA,
            description="Writes the LoRA into models/loras, where Load LoRA lists it. Written to a temporary "
                        "file and renamed, so a crash never leaves half a LoRA.",
            is_output_node=True,
            inputs=[
                io.LoraModel.Input("lora", tooltip="From the Train node or Load Checkpoint LoRA."),
                io.String.Input("filename_prefix", default="flux_dreambooth/lora",
                                tooltip="Name inside models/loras; subfolders are fine ('people/alice'). A "
                                        "counter is added so nothing is overwritten."),
                io.Combo.Input("format", options=list(export.FORMATS), default="kohya",
                               tooltip="kohya (lora_unet_*): what ComfyUI, Forge and most tools read. "
                                       "diffusers: PEFT names for diffusers pipelines; ComfyUI reads it too."),
                io.Combo.Input("precision", options=list(export.SAVE_DTYPES), default="fp16",
                               tooltip="fp16 halves the file at no visible cost (ai-toolkit's default). fp32 "
                                       "stores the weights exactly as trained."),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The saved file's name as Load LoRA lists it.")],
        )

    @classmethod
    def execute(cls, lora, filename_prefix, format, precision) -> io.NodeOutput:
        root = paths.loras_root()
        files.safe_path(root, filename_prefix)  # a name of its own, inside models/loras, before any work
        dtype = export.SAVE_DTYPES[precision]
        if isinstance(lora, export.TrainedLora):
            sd, meta = lora.to_file_dict(format, dtype), dict(lora.metadata, **{"dreambooth.format": format})
        else:  # a LORA_MODEL from another node (e.g. ComfyUI's own trainer): saved as it is
            sd, meta = {k: v.to(dtype) if v.is_floating_point() else v for k, v in lora.items()}, {}
        path = export.save_numbered(root, filename_prefix, sd, meta)
        name = path.relative_to(root.resolve()).as_posix()
        log.info("Saved LoRA %s", path)
        return io.NodeOutput(name, ui={"text": [name]})


def save_section(prompt: dict | None, train_id: str) -> SaveSection | None:
    """The format and precision of the Save FLUX LoRA node that saves Train node `train_id`'s LoRA
    in the running prompt (ComfyUI's hidden PROMPT), as a recipe's save section; None without one."""
    for node in (prompt or {}).values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        link = inputs.get("lora")
        if node.get("class_type") == ids.SAVE and isinstance(link, list) and [str(x) for x in link[:2]] == \
                [str(train_id), "1"]:
            fmt, precision = inputs.get("format"), inputs.get("precision")
            if fmt in export.FORMATS and precision in export.SAVE_DTYPES:
                return SaveSection(dtype=precision, format=fmt)
    return None


class TinyFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.TINY_FLUX,
            display_name="Tiny FLUX (demo, random weights)",
            category=sockets.Category.MODELS,
            description="A FLUX-architecture MODEL, CLIP and VAE at toy sizes with random, seeded weights: "
                        "try the whole pack on a CPU in a minute before downloading 30 GB. Its images are "
                        "noise; what matters is that training, saving and sampling all work. FLUX.1 or "
                        "FLUX.2 [klein] (Qwen3 text encoder, 128-channel VAE; needs a ComfyUI with FLUX.2 [klein]).",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Same seed, same weights."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Store the transformer like the stock UNET loader would (fp8_e4m3fn, "
                                       "bf16…), to try those training paths."),
                io.Combo.Input("family", options=list(TINY_FAMILIES), default="FLUX.1", optional=True,
                               tooltip="Which FLUX to build. FLUX.1: CLIP-L + T5, 16-channel latents. FLUX.1 "
                                       "Kontext [dev]: the edit model (FLUX.1's architecture; train it on edit "
                                       "pairs: the dataset's control_folder, and render with a reference image). "
                                       "FLUX.2: [klein]'s blocks, Qwen3 text encoder, 128-channel latents; needs "
                                       f"ComfyUI ≥ {flux2.MIN_COMFYUI_KLEIN}. Pick the family you will train for "
                                       "real, to try its path first."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, seed, weight_dtype, family="FLUX.1") -> io.NodeOutput:
        if family not in TINY_FAMILIES:
            raise ValueError(f"Tiny FLUX: family is {family!r}; choose from {', '.join(TINY_FAMILIES)}.")
        return io.NodeOutput(*TINY_FAMILIES[family](seed, weight_dtype))
