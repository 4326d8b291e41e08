"""The quickstart, headless: train a LoRA on the embedded tiny FLUX and the bundled photos.

    python -m trainer --out quickstart_output

Prints the loss as it falls, then writes the LoRA (kohya format, loads in ComfyUI's LoraLoader),
a before/after sample of one prompt, and the loss history.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import files
from .data import datasets
from .data.encode import encode_dataset
from .data.images import Shaping
from .families.conditioning import Conditioning
from .families.flux1 import tiny
from .log import logger
from .loop.trainer import TrainConfig, fixed_noise_loss, train
from .lora.targets import LayerSpec
from .lora.weights import LoraSet
from .outputs import export
from .outputs.sample import sample

log = logger(__name__)

QUICKSTART_IMAGES = Path(__file__).parent / "assets" / "quickstart"
TRIGGER = "sks"
PROMPT = "a photo of sks toy on a beige table"
# The tiny model is random and small: it takes a larger learning rate than real FLUX (1e-4).
DEFAULTS = dict(steps=60, learning_rate=2e-3, rank=8, resolution=128, seed=0)


def to_image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def run(out: Path, steps: int, learning_rate: float, rank: int, resolution: int, seed: int) -> dict:
    started = time.perf_counter()
    config = TrainConfig(steps=steps, learning_rate=learning_rate, seed=seed)  # bad settings: before any work
    files.check_writable(out, 64 << 20)  # before training: a read-only or full disk fails now, not at the end
    model = tiny.build(seed)
    options = datasets.Options(trigger_word=TRIGGER, shaping=Shaping(resolution))
    dataset = datasets.from_folder(QUICKSTART_IMAGES, options)
    examples, _ = encode_dataset(dataset, model)
    backend = model.backend()
    spec = LayerSpec.preset("attention+mlp", backend.dims, rank=rank)
    lora = LoraSet(spec.targets(backend.dims), seed=seed)
    log.info("Tiny FLUX %s, %d images at %d², %d LoRA layers (rank %d), %d steps.",
             backend.dims, len(examples), resolution, len(lora), rank, steps)

    prompt = Conditioning.of([model.encode_text(PROMPT)], guidance=3.5)
    latent = resolution // 8

    def render() -> Image.Image:
        with backend.lora_applied(lora):
            return to_image(model.decode(sample(backend, prompt, latent, latent, seed=seed)))

    loss_before = fixed_noise_loss(backend, lora, examples, config.guidance)
    before = render()

    def report(info):
        if info.step % 10 == 0 or info.step == info.total:
            log.info("step %4d/%d  loss %.4f  lr %.2e", info.step, info.total, info.loss, info.lr)

    result = train(backend, lora, examples, config, on_step=report)
    loss_after = fixed_noise_loss(backend, lora, examples, config.guidance)
    after = render()

    out.mkdir(parents=True, exist_ok=True)
    meta = export.LoraMetadata(spec, TRIGGER, model.name).header(result.steps_done)
    lora_path = files.write_safetensors(out / "quickstart_lora.safetensors", export.state_dict(lora), meta)
    files.write_image(out / "sample_before.png", before)
    files.write_image(out / "sample_after.png", after)
    summary = {"fixed_noise_loss_before": loss_before, "fixed_noise_loss_after": loss_after,
               "losses": result.losses, "seconds": time.perf_counter() - started, "lora": str(lora_path)}
    files.write_json(out / "loss_history.json", summary, indent=1)
    log.info("Fixed-noise loss %.4f -> %.4f (%+.1f%%). Wrote %s, sample_before.png, sample_after.png "
             "in %s (%.1f s).", loss_before, loss_after, 100 * (loss_after / loss_before - 1),
             lora_path.name, out, summary["seconds"])
    return summary


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart_output"), help="where to write results")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(args.out, args.steps, args.learning_rate, args.rank, args.resolution, args.seed)
