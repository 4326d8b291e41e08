"""Class images for prior preservation (DreamBooth): photos of the class ('a photo of a person')
rendered by the frozen base model itself, so training on the subject does not turn every person
into it (seed 003's 'grounding' images). Rendered once, kept, reused by later runs."""

from __future__ import annotations

import hashlib
import math
import re

import comfy.samplers
from comfy_api.latest import io

from ..trainer import data
from ..trainer.cache import weights_fingerprint
from ..trainer.images import Shaping
from . import host
from .types import CATEGORY, Dataset
from .validation import render, save_png


class ClassImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxDreamBoothClassImages",
            display_name="Class Images (prior preservation)",
            category=CATEGORY,
            description="Renders generic photos of the class with the base model before training and returns "
                        "them as a regularisation set: chain it into the subject's dataset through `previous`.",
            inputs=[
                io.Model.Input("model", tooltip="The base model, without the LoRA."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input("prompt", default="a photo of a person",
                                tooltip="The class, as the base model knows it; also the images' caption."),
                io.Int.Input("count", default=50, min=1, max=1000,
                             tooltip="How many (seed 002: 50–200). Existing ones are reused; only missing ones "
                                     "render."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16),
                io.Int.Input("height", default=512, min=64, max=2048, step=16),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Image i uses seed + i."),
                io.Int.Input("steps", default=20, min=1, max=100),
                io.Float.Input("guidance", default=3.5, min=0.0, max=20.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Float.Input("loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Prior-preservation weight: how much these count against the subject."),
            ],
            outputs=[Dataset.Output(display_name="dataset"),
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
        folder = host.runs_root() / "class_images" / f"{slug}_{hashlib.sha1(repr(recipe).encode()).hexdigest()[:8]}"
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        for i in range(count):
            image_path = folder / f"{i:04d}.png"
            if image_path.is_file() and image_path.with_suffix(".txt").is_file():
                continue
            image = render(model, vae, conditioning, seed + i, steps, guidance, sampler_name, scheduler, width, height)
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image_path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
            save_png(image, image_path)
        resolution = max(64, int(math.sqrt(width * height)) // 16 * 16)
        dataset = data.from_folder(folder, data.Options(shaping=Shaping(resolution)))
        kept = [i for i in dataset.items if int(i.image.stem) < count]
        dataset = data.Dataset(tuple(kept), "", f"{count} class images of '{prompt}'")
        return io.NodeOutput(dataset.with_items(regularisation=True, loss_weight=loss_weight),
                             str(folder.relative_to(host.runs_root().parent)))
