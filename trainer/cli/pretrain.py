"""`python -m trainer pretrain`: the tiny FLUX's weights, reproduced from a seed (../pretrain/run.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..pretrain.run import PretrainSettings, pretrain


def add_arguments(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the tiny FLUX on the synthetic shapes world",
                       description="Train the tiny FLUX's VAE, transformer and text encoders on generated scenes "
                                   "('a red circle on a blue background, top left') and write them as "
                                   "safetensors with a report.json. The pack ships what the defaults write "
                                   "(trainer/assets/tiny_flux).")
    p.add_argument("--out", type=Path, required=True, help="folder for the four .safetensors files and report.json")
    p.add_argument("--seed", type=int, default=0, help="every random draw comes from it (default 0)")
    p.add_argument("--vae-steps", type=int, default=PretrainSettings().vae.steps, help="VAE optimizer steps")
    p.add_argument("--steps", type=int, default=PretrainSettings().denoiser.steps,
                   help="transformer + text encoder optimizer steps")
    p.set_defaults(run=run)


def run(args) -> int:
    if min(args.vae_steps, args.steps) < 1:
        raise ValueError(f"--vae-steps {args.vae_steps} / --steps {args.steps}: both must be at least 1.")
    settings = PretrainSettings(seed=args.seed)
    settings = dataclasses.replace(
        settings, vae=dataclasses.replace(settings.vae, steps=args.vae_steps),
        denoiser=dataclasses.replace(settings.denoiser, steps=args.steps))
    pretrain(args.out, settings)
    return 0
