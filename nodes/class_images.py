"""Class images for prior preservation (DreamBooth): photos of the class ('a photo of a person')
rendered by the frozen base model itself, so training on the subject does not turn every person
into it ('grounding' images). Rendered once, kept, reused by later runs."""

from __future__ import annotations

import hashlib
import math
import re

from comfy_api.latest import io

from ..trainer import files
from ..trainer.data import datasets
from ..trainer.data.encode import weights_fingerprint
from ..trainer.data.images import Shaping
from . import ids, sockets
from .host import paths, sampling


class ClassImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.CLASS_IMAGES,
            display_name="Class Images (prior preservation)",
            category=sockets.Category.DATASET,
            description="Renders generic photos of the class with the base model before training and returns "
                        "them as a regularisation set: chain it into the subject's dataset through `previous`.",
            inputs=[
                io.Model.Input("model", tooltip="The base model, without the LoRA."),
                io.Clip.Input("clip", tooltip="The base model's text encoders, for the prompt."),
                io.Vae.Input("vae", tooltip="The base model's VAE, to decode the images."),
                io.String.Input("prompt", default="a photo of a person",
                                tooltip="The class, as the base model knows it; also the images' caption."),
                io.Int.Input("count", default=50, min=1, max=1000,
                             tooltip="How many (50–200 is usual for a person). Existing ones are reused; only "
                                     "missing ones render."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16,
                             tooltip="Image width: the training resolution (512 or 1024)."),
                io.Int.Input("height", default=512, min=64, max=2048, step=16,
                             tooltip="Image height: the training resolution (512 or 1024)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Image i uses seed + i."),
                io.Int.Input("steps", default=20, min=1, max=100,
                             tooltip="Sampling steps per image: 20 is plenty for class images."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=20.0, step=0.1,
                               tooltip="FLUX guidance, as FluxGuidance sets it (3.5 for dev; ignored by schnell)."),
                io.Combo.Input("sampler_name", options=sampling.SAMPLERS, default="euler",
                               tooltip="KSampler's sampler. euler is what FLUX is usually sampled with."),
                io.Combo.Input("scheduler", options=sampling.SCHEDULERS, default="simple",
                               tooltip="KSampler's scheduler. simple (or beta) suits FLUX."),
                io.Float.Input("loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Prior-preservation weight: how much these count against the subject."),
            ],
            outputs=[sockets.Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="folder", tooltip="Where the images are kept.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompt, count, width, height, seed, steps, guidance, sampler_name, scheduler,
                loss_weight) -> io.NodeOutput:
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("prompt is empty; describe the class, e.g. 'a photo of a person'.")
        recipe = (weights_fingerprint(model.model.diffusion_model), prompt, width, height, seed, steps, guidance,
                  sampler_name, scheduler)
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
        folder = paths.runs_root() / "class_images" / f"{slug}_{hashlib.sha1(repr(recipe).encode()).hexdigest()[:8]}"
        conditioning = sampling.encode_prompt(clip, prompt)
        for i in range(count):
            image_path = folder / f"{i:04d}.png"
            if image_path.is_file() and image_path.with_suffix(".txt").is_file():
                continue
            image = sampling.render(model, vae, conditioning, seed + i, steps, guidance, sampler_name, scheduler,
                                    width, height)
            files.write_text(image_path.with_suffix(".txt"), prompt)
            sampling.save_png(image, image_path)
        resolution = max(64, int(math.sqrt(width * height)) // 16 * 16)
        dataset = datasets.from_folder(folder, datasets.Options(shaping=Shaping(resolution)))
        kept = [i for i in dataset.items if int(i.image.stem) < count]
        dataset = datasets.Dataset(tuple(kept), source=f"{count} class images of '{prompt}'")
        return io.NodeOutput(dataset.with_items(regularisation=True, loss_weight=loss_weight),
                             str(folder.relative_to(paths.runs_root().parent)))
