"""Our recipe written as an ai-toolkit job YAML, in ai-toolkit's own key names.

`export` gives the job (plain data) and what it loses: each of our settings ai-toolkit can't
express, with why, and caveats where ai-toolkit's setting is close but not the same. `write`
puts both in the file, the losses as a comment at the top. Reading the written file back
(`reader`) gives the same recipe for every setting that is not lost.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..build import layer_spec
from ..schema import Recipe, value_of
from . import layers
from .job import our_defaults

TIMESTEPS = {"sigmoid": "sigmoid", "uniform": "linear", "weighted": "weighted", "flux_shift": "flux_shift"}
LOSSES = {"mse": "mse", "l1": "mae", "pseudo_huber": "pseudo_huber"}
EPS_1E6 = ("adamw", "adamw8bit", "prodigy")  # ai-toolkit always gives them eps 1e-6 (in optimizer_params it fails)
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion")


@dataclass
class Export:
    job: dict
    lost: dict[str, str] = field(default_factory=dict)  # our key -> why ai-toolkit can't express it
    caveats: list[str] = field(default_factory=list)


def export(recipe: Recipe) -> Export:
    out = Export({})
    d, v, s = recipe.dataset, recipe.validation, recipe.save
    process: dict[str, Any] = {"type": "sd_trainer", "training_folder": s.output or "output", "device": "cuda:0"}
    if not s.output:
        out.lost["save.output"] = ("empty here (./flux_dreambooth_output); ai-toolkit needs a training_folder: "
                                   "written as output")
    if d.trigger.strip():
        process["trigger_word"] = d.trigger.strip()
    process["network"] = _network(recipe, out)
    process["save"] = {"dtype": {"fp16": "float16", "bf16": "bf16", "fp32": "float32"}[s.dtype],
                       "save_every": s.every, "max_step_saves_to_keep": s.keep_last}
    out.caveats.append("save.format: ai-toolkit has no such setting; it saves FLUX LoRAs with diffusers (peft) "
                       "keys, which ComfyUI loads too.")
    process["datasets"] = _datasets(recipe, out)
    process["train"] = _train(recipe, out)
    process["model"] = {"name_or_path": "black-forest-labs/FLUX.1-dev", "is_flux": True, "quantize": False}
    out.caveats.append("model.name_or_path: this pack trains the model ComfyUI loads; FLUX.1-dev is written as the "
                       "usual one, change it to yours.")
    size = v.size or d.resolution[0]
    process["sample"] = {"sampler": "flowmatch", "sample_every": v.every, "width": size, "height": size,
                         "prompts": list(v.prompts), "neg": "", "seed": v.seed, "walk_seed": False,
                         "guidance_scale": v.guidance, "sample_steps": v.steps}
    if not v.size:
        out.lost["validation.size"] = f"0 (the first training resolution): ai-toolkit needs a size, written as {size}"
    out.job = {"job": "extension", "config": {"name": s.name, "process": [process]},
               "meta": {"name": "[name]", "version": "1.0"}}
    for key in ("dataset.captions", "dataset.concepts", "dataset.problems", "train.seed", "save.format"):
        _lost_unless_default(recipe, out, key, "ai-toolkit has no such setting")
    _read_back(recipe, out)
    return out


def _read_back(recipe: Recipe, out: Export) -> None:
    """The job read back as ai-toolkit's: any setting that comes back different and is not named
    yet (a key this pack gained after the writer was written) is named too; none is lost silently."""
    from .reader import read  # the reader is the writer's check

    back = read(out.job, Path("exported.yaml")).recipe
    named = set(out.lost) | {c.split(":")[0].split(" ")[0] for c in out.caveats}
    if recipe.layers.groups:  # the single-group keys are not used then
        named |= {f"layers.{k}" for k in ("preset", "blocks", "start", "end", "layer_types", "rank", "alpha")}
    ours, theirs = _leaves(recipe.to_dict()), _leaves(back.to_dict())
    for key, value in ours.items():
        if theirs.get(key) != value and not any(key == n or key.startswith(f"{n}.") for n in named):
            out.lost[key] = f"{value!r}: ai-toolkit's job has no such setting"


def _leaves(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, f"{key}.") if isinstance(v, dict) and v and key != "train.optimizer_args" else {key: v})
    return out


def _lost_unless_default(recipe: Recipe, out: Export, key: str, why: str) -> None:
    value = value_of(recipe, key)
    if value != our_defaults()[key]:
        out.lost[key] = f"{value!r}: {why}"


def _network(recipe: Recipe, out: Export) -> dict:
    lay = recipe.layers
    spec = layer_spec(recipe, layers.DIMS)
    targets = spec.targets(layers.DIMS)
    chosen = {(t.name.split(".")[0], int(t.name.split(".")[1]), t.name.split(".", 2)[2]) for t in targets}
    ranks = {t.rank for t in targets}
    rank = max(ranks)
    if len(ranks) > 1:
        out.lost["layers.groups"] = (f"ranks {sorted(ranks)}: ai-toolkit trains every layer at one rank "
                                     f"(written: {rank})")
    variants = sorted({(t.variant, t.lokr_factor, t.lokr_full_rank) for t in targets})
    if len(variants) > 1:
        named = [f"{v} (lokr_factor {f}, lokr_full_rank {r})" if v == "lokr" else v for v, f, r in variants]
        why = (f"variants {', '.join(named)}: ai-toolkit's network has one type and one lokr_factor for every "
               "layer (no per-module settings)")
        out.lost["layers.groups"] = "; ".join(filter(None, (out.lost.get("layers.groups"), why)))
    if any(t.scale != 1 for t in targets):
        key = "layers.groups" if lay.groups else "layers.alpha"
        out.lost.setdefault(key, "alpha ≠ rank: ai-toolkit trains FLUX LoRAs with alpha = rank (peft format)")
    network: dict[str, Any] = {"type": "lora", "linear": rank, "linear_alpha": rank}
    variant, factor, full = variants[0] if len(variants) == 1 else ("lora", -1, False)
    if variant == "lokr":  # ai-toolkit's LoKr (network.type lokr), sized as ours
        network.update(type="lokr", lokr_factor=factor, lokr_full_rank=full)
    filters = layers.to_filters(chosen)
    if filters:
        network["network_kwargs"] = filters
    return network


def _datasets(recipe: Recipe, out: Export) -> list[dict]:
    d = recipe.dataset
    shared = {"caption_ext": d.caption_ext.lstrip("."), "resolution": list(d.resolution), "buckets": d.bucketing,
              "random_crop": d.crop == "random", "cache_latents_to_disk": True}
    subject = {"caption_dropout_rate": d.caption_dropout, "num_repeats": d.repeats, "flip_x": d.flip,
               "shuffle_tokens": d.shuffle_tags, "network_weight": d.network_weight,
               **({"default_caption": d.default_caption} if d.default_caption else {})}
    sets = [{"folder_path": f, **shared, **subject, "is_reg": False} for f in d.folders]
    for one, control in zip(sets, d.control_path):  # Kontext edit pairs
        one["control_path"] = control
    reg = {"default_caption": d.class_word.strip()} if d.class_word.strip() else {}
    sets += [{"folder_path": f, **shared, **reg, "network_weight": d.regularisation_network_weight, "is_reg": True}
             for f in d.regularisation]
    if d.class_word.strip() and not d.regularisation:
        out.lost["dataset.class_word"] = (f"{d.class_word!r}: ai-toolkit has a class word only as the default_caption "
                                          "of a regularisation set (is_reg), and this recipe has none")
    unused = (("dataset.caption_dropout", "dataset.repeats", "dataset.flip", "dataset.default_caption",
               "dataset.shuffle_tags", "dataset.network_weight")
              + (() if d.regularisation else ("dataset.resolution", "dataset.bucketing", "dataset.crop")))
    for key in unused if not d.folders else ():
        _lost_unless_default(recipe, out, key, "ai-toolkit keeps it with a dataset, and this recipe has no folder")
    if d.caption_dropout:
        out.caveats.append("dataset.caption_dropout: ai-toolkit drops the whole caption; this pack keeps the trigger "
                           "(and class word).")
    if d.regularisation:
        out.caveats.append("dataset.regularisation: ai-toolkit makes every other step a regularisation batch; this "
                           "pack mixes the regularisation photos in with the subject's.")
    return sets


def _train(recipe: Recipe, out: Export) -> dict:
    t = recipe.train
    train: dict[str, Any] = {"batch_size": t.batch_size, "steps": t.steps,
                             "gradient_accumulation": t.gradient_accumulation_steps, "train_unet": True,
                             "train_text_encoder": t.text_encoder_lr > 0,
                             "gradient_checkpointing": t.memory.checkpointing != "off", "noise_scheduler": "flowmatch"}
    mode = t.timesteps.mode
    if mode == "logit_normal" and (t.timesteps.logit_mean, t.timesteps.logit_std) == (0.0, 1.0):
        mode = "sigmoid"  # the same draw
    train["timestep_type"] = TIMESTEPS.get(mode, "sigmoid")
    if mode not in TIMESTEPS:
        out.lost["train.timesteps.mode"] = f"{t.timesteps.mode}: not one of ai-toolkit's (written: sigmoid)"
    if mode == "flux_shift":
        out.caveats.append("train.timesteps.mode flux_shift: ai-toolkit's shifts evenly spread σ; this pack's "
                           "logit-normal σ.")
    for key in ("train.timesteps.logit_mean", "train.timesteps.logit_std", "train.timesteps.mode_scale",
                "train.timesteps.shift"):
        if t.timesteps.mode != "logit_normal" or key.endswith(("mode_scale", "shift")):
            _lost_unless_default(recipe, out, key, "ai-toolkit's timestep types have no such setting")
    _optimizer(recipe, out, train)
    if t.text_encoder_lr > 0:
        train["text_encoder_lr"] = t.text_encoder_lr
        if t.text_encoder_start:
            out.lost["train.text_encoder_start"] = (
                f"{t.text_encoder_start:g}: ai-toolkit trains the text encoder from the first step (its recipes run "
                "a second job, resumed with train_text_encoder on, for a late phase)")
    if t.dop_multiplier:
        train.update(diff_output_preservation=True, diff_output_preservation_multiplier=t.dop_multiplier,
                     diff_output_preservation_class=t.dop_class or recipe.dataset.class_word.strip())
        if not t.dop_class:
            out.caveats.append(f"train.dop_class: empty here (the class word), written as the class word "
                               f"{recipe.dataset.class_word.strip()!r}.")
    train["max_grad_norm"] = t.max_grad_norm
    train["loss_type"] = LOSSES.get(t.loss.kind, "mse")
    if t.loss.kind not in LOSSES:
        out.lost["train.loss.kind"] = f"{t.loss.kind}: ai-toolkit has mse, mae and pseudo_huber (written: mse)"
    if t.loss.kind == "pseudo_huber" and t.loss.huber_c != 0.01:
        out.lost["train.loss.huber_c"] = f"{t.loss.huber_c}: ai-toolkit's pseudo_huber has c 0.01"
    _lost_unless_default(recipe, out, "train.loss.weighting", "ai-toolkit has no such loss weighting")
    train["ema_config"] = {"use_ema": True, "ema_decay": t.ema_decay} if t.ema_decay else {"use_ema": False}
    train["dtype"] = "bf16"
    train["cfg_scale"] = t.guidance
    if recipe.dataset.regularisation:
        train["reg_weight"] = recipe.dataset.regularisation_weight
    else:
        _lost_unless_default(recipe, out, "dataset.regularisation_weight", "there is no regularisation set to weight")
    train["skip_first_sample"] = not recipe.validation.before_training
    train["disable_sampling"] = not recipe.validation.prompts
    if t.memory.checkpointing == "offload":
        out.lost["train.memory.checkpointing"] = "offload: ai-toolkit's gradient_checkpointing keeps them on the GPU"
    for key in ("train.memory.checkpoint_every", "train.memory.swap_blocks", "train.memory.compile"):
        _lost_unless_default(recipe, out, key, "ai-toolkit has no such memory setting for FLUX LoRAs")
    return train


def _optimizer(recipe: Recipe, out: Export, train: dict) -> None:
    t = recipe.train
    train["optimizer"] = t.optimizer if t.optimizer in OPTIMIZERS else "adamw"
    if t.optimizer not in OPTIMIZERS:
        out.lost["train.optimizer"] = f"{t.optimizer}: ai-toolkit has no such optimizer (written: adamw)"
    train["lr"] = t.learning_rate
    if t.optimizer == "prodigy" and t.learning_rate < 0.1:
        out.lost["train.learning_rate"] = f"{t.learning_rate:g}: ai-toolkit runs prodigy at 1.0 when lr is below 0.1"
    args = dict(t.optimizer_args)
    if train["optimizer"] in EPS_1E6 and args.pop("eps", None) != 1e-6:
        out.lost["train.optimizer_args"] = f"eps {t.optimizer_args.get('eps', 'the default')}: ai-toolkit gives " \
                                           f"{train['optimizer']} eps 1e-6, always"
    train["optimizer_params"] = {"weight_decay": t.weight_decay, **args}
    schedule, warmup = t.lr_schedule, t.warmup_steps
    if schedule == "constant" and warmup:
        out.lost["train.lr_schedule"] = "constant with warm-up: ai-toolkit's is constant_with_warmup (the same)"
        schedule = "constant_with_warmup"
    if schedule == "polynomial":
        out.lost["train.lr_schedule"] = "polynomial: ai-toolkit can't run it (written: linear)"
        schedule = "linear"
    train["lr_scheduler"] = schedule
    if schedule == "constant_with_warmup":
        train["lr_scheduler_params"] = {"num_warmup_steps": warmup}
    elif warmup:
        out.lost["train.warmup_steps"] = f"{warmup}: ai-toolkit warms up only with constant_with_warmup"
    if schedule == "linear":
        train["lr_scheduler_params"] = {"start_factor": 1.0, "end_factor": 0.0}
    if t.lr_num_cycles != 1 and t.lr_schedule == "cosine_with_restarts":
        out.lost["train.lr_num_cycles"] = f"{t.lr_num_cycles}: ai-toolkit's cosine_with_restarts runs one cycle"
    for key in ("train.lr_power", "train.lr_end"):
        if t.lr_schedule == "polynomial":
            _lost_unless_default(recipe, out, key, "ai-toolkit has no polynomial schedule")


class _Dumper(yaml.SafeDumper):
    """Block style as in ai-toolkit's examples, each list written out (no YAML anchors)."""

    def ignore_aliases(self, data) -> bool:
        return True


def write(recipe: Recipe) -> str:
    """The recipe as an ai-toolkit job YAML: what it can't express in a comment at the top."""
    result = export(recipe)
    lines = ["# ai-toolkit job written by comfyui-flux-dreambooth (python -m trainer config … --to ai-toolkit).",
             "# Run it with ai-toolkit: python run.py THIS_FILE. Relative paths: ai-toolkit reads them from the",
             "# folder it runs in, the recipe read them from its own folder."]
    if result.lost:
        lines.append("# Settings of the recipe ai-toolkit can't express:")
        for key, why in result.lost.items():
            lines += textwrap.wrap(f"{key}: {why}", 96, initial_indent="#   ", subsequent_indent="#     ")
    if result.caveats:
        lines.append("# Close, not the same:")
        for text in result.caveats:
            lines += textwrap.wrap(text, 96, initial_indent="#   ", subsequent_indent="#     ")
    body = yaml.dump(result.job, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(lines) + "\n" + body
