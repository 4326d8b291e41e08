"""Dataset nodes: a folder of photos with captions, or an mflux train config."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer import data
from ..trainer.layers import LayerSpec
from . import host
from .types import CATEGORY, Dataset, LoraLayers

TRIGGER_TIP = ("A rare word that will mean your subject, e.g. 'sks' or 'ohwx'. Put into every caption: "
               "it replaces '[trigger]', or is prepended when the caption lacks it. Leave empty for styles "
               "whose captions already say everything.")
REPEATS_TIP = ("How often each image appears per epoch, relative to the datasets chained to this one: raise it "
               "for a set with fewer photos. 1 is fine for a dataset on its own.")
PREVIOUS_TIP = ("Another dataset to train on together with this one: a second subject with its own trigger word, "
                "or more photos of the same one.")


def _chain(previous: data.Dataset | None, dataset: data.Dataset) -> data.Dataset:
    return dataset if previous is None else previous + dataset


def _summary(dataset: data.Dataset) -> str:
    captions = "\n".join(f"{i.image.name}: {i.caption}" for i in dataset.items[:8])
    more = f"\n… and {len(dataset) - 8} more" if len(dataset) > 8 else ""
    return f"{len(dataset)} images from {dataset.source}\n{captions}{more}"


class DatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxDreamBoothDatasetFolder",
            display_name="DreamBooth Dataset (folder)",
            category=CATEGORY,
            description="Photos with same-name .txt captions (photo.jpg + photo.txt), as kohya and "
                        "SimpleTuner's 'textfile' captions. Every unreadable image or missing caption is "
                        "reported by name before training starts.",
            inputs=[
                Dataset.Input("previous", optional=True, tooltip=PREVIOUS_TIP),
                io.String.Input("folder", default="builtin:quickstart",
                                tooltip="Folder of images (.png .jpg .webp) and captions (.txt). Absolute, or "
                                        "relative to ComfyUI's input folder. 'builtin:quickstart' is the small "
                                        "example set that ships with this pack."),
                io.String.Input("trigger_word", default="sks", tooltip=TRIGGER_TIP),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip=REPEATS_TIP),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="summary", tooltip="Image count and captions, to check.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **_):
        return data.fingerprint(host.resolve_input_path(folder, "folder"))

    @classmethod
    def execute(cls, folder, trigger_word, repeats, previous=None) -> io.NodeOutput:
        dataset = _chain(previous, data.from_folder(host.resolve_input_path(folder, "folder"), trigger_word, repeats))
        return io.NodeOutput(dataset, _summary(dataset))


class DatasetFromMfluxConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxDreamBoothDatasetMflux",
            display_name="DreamBooth Dataset (mflux config)",
            category=CATEGORY,
            description="Reads an mflux train config: its `examples` block (a path and {image, prompt} "
                        "pairs) becomes the dataset, its `lora_layers` the layer selection.",
            inputs=[
                Dataset.Input("previous", optional=True, tooltip=PREVIOUS_TIP),
                io.String.Input("config_path", default="",
                                tooltip="Path to the mflux JSON config (absolute, or relative to ComfyUI's input "
                                        "folder). Image paths are read relative to the config, as mflux does."),
                io.String.Input("trigger_word", default="", tooltip=TRIGGER_TIP),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip=REPEATS_TIP),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
                     LoraLayers.Output(display_name="lora_layers",
                                       tooltip="The config's lora_layers, for the Train node's lora_layers input."),
                     io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, config_path, **_):
        return data.fingerprint(host.resolve_input_path(config_path, "config_path"))

    @classmethod
    def execute(cls, config_path, trigger_word, repeats, previous=None) -> io.NodeOutput:
        path = host.resolve_input_path(config_path, "config_path")
        dataset, config = data.from_mflux_config(path, trigger_word, repeats)
        layers = LayerSpec.from_mflux(config["lora_layers"], source=str(path)) if config.get("lora_layers") else None
        dataset = _chain(previous, dataset)
        return io.NodeOutput(dataset, layers, _summary(dataset))
