"""The tiny FLUX's pretraining, end to end: `python -m trainer pretrain --out DIR`.

    1. the VAE on world scenes and quickstart crops (autoencoder.py), then its latents normalised;
    2. the transformer and text encoders on captioned scenes (denoiser.py);
    3. a check: five shape prompts sampled and read back off their pixels (world.describe);
    4. the weights written as safetensors (one file per model, its config in the metadata) and a
       report.json with the losses, the check and the time it took.

Everything comes from one seed, so the shipped weights are what this writes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .. import files
from ..families.conditioning import Conditioning
from ..families.flux1 import tiny
from ..outputs.sample import sample
from . import world
from .autoencoder import VaeSettings, normalise, reconstruction_error, to_pixels, train_vae
from .denoiser import GUIDANCE, DenoiserSettings, train_denoiser

log = logging.getLogger(__name__)

QUICKSTART_PHOTOS = Path(__file__).parent.parent / "assets" / "quickstart"
MODEL_SHAPE = {"hidden_heads": 1, "double_blocks": 2, "single_blocks": 4}  # 128 wide: a few MB in fp16
CHECK_SCENES = [world.Scene("red", "circle", "top left", "blue"), world.Scene("yellow", "square", "bottom right",
                "black"), world.Scene("green", "triangle", "in the center", "white"),
                world.Scene("white", "circle", "bottom left", "purple"),
                world.Scene("blue", "square", "top right", "orange")]


@dataclass
class PretrainSettings:
    seed: int = 0
    vae: VaeSettings = field(default_factory=VaeSettings)
    denoiser: DenoiserSettings = field(default_factory=DenoiserSettings)
    sample_steps: int = 20


def render(model: tiny.TinyFlux, caption: str, size: int, steps: int, seed: int) -> Image.Image:
    cond = Conditioning.of([model.encode_text(caption)], GUIDANCE)
    latents = sample(model.backend(), cond, size // 8, size // 8, steps, seed)
    pixels = model.decode(latents)[0].permute(1, 2, 0).numpy()
    return Image.fromarray((pixels * 255).round().astype("uint8"))


def prompt_check(model: tiny.TinyFlux, size: int, steps: int, seed: int = 0) -> list[dict]:
    """Each check scene's caption sampled once and read back: what it asked, what came out."""
    out = []
    for i, scene in enumerate(CHECK_SCENES):
        reading = world.describe(render(model, scene.caption, size, steps, seed + i))
        out.append({"prompt": scene.caption, "read": asdict(reading), "matches": reading.matches(scene)})
    return out


def save_model(model: tiny.TinyFlux, out: Path, settings: PretrainSettings, dtype=torch.float16) -> None:
    """One safetensors file per model, written atomically; the build arguments in each header."""
    meta = {tiny.BUILD_KEY: json.dumps({"seed": settings.seed, **MODEL_SHAPE})}
    for name in tiny.COMPONENTS:
        state = {k: v.detach().to(dtype).contiguous() for k, v in getattr(model, name).state_dict().items()}
        files.write_safetensors(out / f"{name}.safetensors", state, meta)


def pretrain(out: Path, settings: PretrainSettings) -> dict:
    started = time.perf_counter()
    files.check_writable(out, 64 << 20)
    model = tiny.build(settings.seed, **MODEL_SHAPE)

    def progress(stage: str, total: int):
        def report(step: int, loss: float) -> None:
            if step % 50 == 0 or step == total - 1:
                log.info("%s step %d/%d loss %.4f (%.0f s)", stage, step + 1, total, loss,
                         time.perf_counter() - started)
        return report

    vae_losses = train_vae(model.vae, settings.vae, settings.seed, QUICKSTART_PHOTOS,
                           progress("vae", settings.vae.steps))
    rng = random.Random(settings.seed + 1)
    held_out = to_pixels([world.draw(world.random_scene(rng), settings.denoiser.size, 0.3, rng) for _ in range(64)])
    normalise(model.vae, held_out, tiny.VAE_SCALE, tiny.VAE_SHIFT)
    vae_seconds = time.perf_counter() - started
    denoiser_losses = train_denoiser(model, settings.denoiser, settings.seed,
                                     progress("transformer", settings.denoiser.steps))
    check = prompt_check(model, settings.denoiser.size, settings.sample_steps)
    save_model(model, out, settings)
    report = {
        "seconds": round(time.perf_counter() - started, 1), "vae_seconds": round(vae_seconds, 1),
        "threads": torch.get_num_threads(), "settings": asdict(settings),
        "vae_reconstruction_l1": reconstruction_error(model.vae, held_out),
        "vae_loss": [vae_losses[0], vae_losses[-1]], "denoiser_loss": [denoiser_losses[0], denoiser_losses[-1]],
        "prompt_check": check, "prompts_matched": sum(c["matches"] for c in check),
    }
    files.write_json(out / "report.json", report, indent=2)
    log.info("Pretrained in %.0f s: VAE reconstruction error %.3f, %d of %d shape prompts drawn as asked; "
             "weights in %s.", report["seconds"], report["vae_reconstruction_l1"], report["prompts_matched"],
             len(check), out)
    return report
