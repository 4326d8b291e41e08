"""Import Training Config: a config file users already have (ai-toolkit, SimpleTuner, mflux,
diffusers' flags, or this pack's own recipe) as the inputs of the Train node, with a summary of
which of its settings took effect and which could not."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.recipe import build, formats
from ..trainer.recipe.importing import Imported
from . import ids, sockets
from .host import paths
from .settings import TrainingSettings
from .validation import plan_from_recipe

PASTED = "pasted config"  # how pasted text is named in messages; its paths start at the input folder


def read(config_path: str, config_text: str) -> Imported:
    """The config from a file (absolute, or relative to ComfyUI's input folder) or pasted text."""
    if config_path.strip() and config_text.strip():
        raise ValueError("config_path and config_text are both set; give one of them (clear the other).")
    if config_path.strip():
        return formats.load(paths.resolve_input_path(config_path, "config_path"))
    if config_text.strip():
        return formats.loads(config_text, paths.input_root() / PASTED)
    raise ValueError("config_path and config_text are both empty; name a config file in ComfyUI's input folder "
                     "(e.g. 'my_lora.yaml') or paste its text into config_text.")


class ImportTrainingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.IMPORT_CONFIG,
            display_name="Import Training Config",
            category=sockets.Category.TRAINING,
            description="Bring the config you already have: an ai-toolkit job YAML, a SimpleTuner config.json, "
                        "an mflux train config, diffusers' train_dreambooth_lora_flux.py flags, or a recipe of "
                        "this pack. Its outputs plug into the Train node; the summary lists every key of the "
                        "file that took effect and every one that could not, with the reason.",
            inputs=[
                io.String.Input("config_path", default="",
                                tooltip="The config file: a path relative to ComfyUI's input folder "
                                        "('my_lora.yaml', 'recipes/sks_dog.json') or absolute. The format is told "
                                        "from the content. Its folders (ai-toolkit's folder_path, SimpleTuner's "
                                        "instance_data_dir, …) are read relative to the file, as the tools do."),
                io.String.Input("config_text", multiline=True, default="",
                                tooltip="Or paste the config here (leave config_path empty). Relative folders "
                                        "are read from ComfyUI's input folder."),
            ],
            outputs=[
                sockets.Dataset.Output(display_name="dataset", tooltip="The config's photos (and regularisation "
                                                                       "sets), for the Train node's dataset."),
                sockets.LoraLayers.Output(display_name="lora_layers",
                                          tooltip="The config's layers, rank and alpha (fitted to the model "
                                                  "when it trains: presets and open block ranges)."),
                sockets.TrainingSettings.Output(display_name="settings",
                                                tooltip="The config's whole train section (steps, learning rate, "
                                                        "optimizer, schedule, timesteps, loss, EMA…): used "
                                                        "instead of the Train node's own widgets."),
                sockets.Validation.Output(display_name="validation",
                                          tooltip="The config's sample prompts, seed and steps (none when it "
                                                  "has no prompts)."),
                sockets.RunSettings.Output(display_name="run", tooltip="The config's run name, save_every and "
                                                                       "how many checkpoints to keep."),
                io.String.Output(display_name="summary", tooltip="What took effect, what did not and why."),
            ],
        )

    @classmethod
    def execute(cls, config_path, config_text) -> io.NodeOutput:
        imported = read(config_path, config_text)
        recipe, base = imported.recipe, imported.source.parent
        build.check_paths(recipe, base, imported.origins)  # a missing folder, named by the file's key
        dataset = build.dataset(recipe, base)
        save = recipe.save
        summary = "\n".join([
            f"{imported.source.name}: {imported.format} format; {recipe.train.steps} steps at learning_rate "
            f"{recipe.train.learning_rate:g}, {len(dataset)} images.", *imported.summary(),
            f"Save it with Save FLUX LoRA as format {save.format}, precision {save.dtype} (the config's save "
            "section)."])
        return io.NodeOutput(dataset, build.RecipeLayers(recipe), TrainingSettings(config=recipe.train),
                             plan_from_recipe(recipe.validation, recipe.dataset.resolution[0]),
                             build.run_settings(recipe), summary, ui={"text": [summary]})
