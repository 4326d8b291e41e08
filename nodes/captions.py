"""Caption a folder of photos with a local vision-language model, then look and edit before
training: the captions come back in `edited_captions`, and lines changed there are written back."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.data import captioning, datasets, folders, images
from . import ids, sockets
from .host import events, models, paths

NO_MODEL = "(put a transformers model folder in models/vlm)"


class CaptionImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.CAPTION,
            display_name="Caption Images (VLM)",
            category=sockets.Category.DATASET,
            description="Writes a .txt caption next to every photo that has none, with a local vision-language "
                        "model (Florence-2, BLIP, Qwen2-VL / Qwen2.5-VL, JoyCaption…) from models/vlm or "
                        "models/LLM. The captions then show in edited_captions: change any and queue again.",
            is_output_node=True,
            inputs=[
                io.String.Input("folder", default="", tooltip="The photos' folder (absolute, or relative to "
                                                              "ComfyUI's input folder)."),
                io.Combo.Input("model", options=paths.vlm_models() or [NO_MODEL],
                               tooltip="A transformers model folder: Florence-2 and BLIP write plain captions; "
                                       "chat models (Qwen2-VL, JoyCaption) also take a reference photo."),
                io.Combo.Input("style", options=list(captioning.STYLES), default="short",
                               tooltip="short: one simple sentence (mflux's advice: keep training prompts simple). "
                                       "detailed: a paragraph on pose, clothing, setting, light."),
                io.String.Input("trigger_word", default="sks", tooltip="Put first in every caption, with the class."),
                io.String.Input("class_word", default="", tooltip="'person', 'dog'…: follows the trigger word."),
                io.Image.Input("reference", optional=True,
                               tooltip="A clear photo of the subject (a selfie): a chat model then says "
                                       "where the subject is in each photo and what differs (glasses, beard)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Caption photos that already have a .txt again. Off keeps your captions."),
                io.Int.Input("max_new_tokens", default=80, min=8, max=512,
                             tooltip="Longest caption, in tokens (short style stops at 40)."),
                io.String.Input("edited_captions", multiline=True, default="",
                                tooltip="Filled in after a run, one 'file: caption' per line. Edit and queue again: "
                                        "changed lines are written to the .txt files and win over the model."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="Connect to the dataset node's folder."),
                     io.String.Output(display_name="captions")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **_):
        return datasets.fingerprint(paths.resolve_input_path(folder, "folder"))

    @classmethod
    def execute(cls, folder, model, style, trigger_word, class_word, overwrite, max_new_tokens, edited_captions,
                reference=None) -> io.NodeOutput:
        path = paths.resolve_input_path(folder, "folder")
        edits = captioning.parse_edits(edited_captions)
        captioning.apply_edits(path, edits)
        todo = [p for p in folders.list_folder(path).photos
                if p.name not in edits and (overwrite or not p.with_suffix(".txt").is_file())]
        if todo and model == NO_MODEL:
            raise ValueError(f"{len(todo)} photo(s) in {path} have no caption and no model is installed: put a "
                             "transformers model folder (e.g. Florence-2-base) in models/vlm.")
        captioner = None
        if todo:
            device, dtype = models.torch_device_and_dtype()
            captioner = captioning.Captioner(paths.vlm_path(model), device, dtype, max_new_tokens)
        bar = events.progress_bar(1)
        result = captioning.caption_folder(path, captioner, style, trigger_word.strip(), class_word.strip(),
                                         images.from_tensor(reference[0]) if reference is not None else None,
                                         overwrite, skip=set(edits), on_progress=bar.update_absolute)
        del captioner
        models.release_memory()
        text = "\n".join(f"{name}: {caption}" for name, caption, _ in result)
        return io.NodeOutput(str(path), text, ui={"captions": [text]})
