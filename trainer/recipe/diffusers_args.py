"""diffusers' examples/dreambooth/train_dreambooth_lora_flux.py as a recipe, from its argument list
(the `accelerate launch train_dreambooth_lora_flux.py --flag …` of a script or README; see shell.py).

What the flags do, as the script does them:

- every photo of --instance_data_dir trains with --instance_prompt as its caption, resized and cropped
  to a --resolution square (at a random place unless --center_crop);
- steps are --max_train_steps, else --num_train_epochs × ⌈⌈photos / batch⌉ / accumulation⌉, where
  with prior preservation an epoch is the larger of the photo and class-photo counts;
- --weighting_scheme picks σ: logit_normal and mode draw it from that density; sigma_sqrt, cosmap and
  none draw it uniformly and weight the loss (not for none). σ is 1 − u of the draw, so its
  --logit_mean m is −m here (the mode density is symmetric);
- --lora_layers names modules by the end of their path: `to_k` is attn.to_k of every block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data.images import EXTENSIONS
from ..families.flux1.layers import VOCABULARY
from .fields import suggest
from .importing import Imported, Mapping, resolve
from .schema import Recipe, value_of
from .shell import parse

SCRIPT = "train_dreambooth_lora_flux.py"
SWITCHES = frozenset({"with_prior_preservation", "center_crop", "random_flip", "train_text_encoder",
                      "gradient_checkpointing", "scale_lr", "use_8bit_adam", "push_to_hub", "allow_tf32",
                      "cache_latents", "upcast_before_saving", "enable_npu_flash_attention"})
SAME = {  # flag -> our key, the same meaning and value
    "instance_data_dir": "dataset.folders", "repeats": "dataset.repeats", "random_flip": "dataset.flip",
    "train_batch_size": "train.batch_size", "max_train_steps": "train.steps", "learning_rate": "train.learning_rate",
    "lr_scheduler": "train.lr_schedule", "lr_warmup_steps": "train.warmup_steps",
    "lr_num_cycles": "train.lr_num_cycles", "lr_power": "train.lr_power", "adam_weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "guidance_scale": "train.guidance",
    "rank": "layers.rank", "lora_alpha": "layers.alpha",
    "checkpointing_steps": "save.every", "checkpoints_total_limit": "save.keep_last", "output_dir": "save.output",
}
NOTES = {  # flag -> what the user reads: nothing of the trained LoRA depends on it here
    "revision": "a revision of the model on the Hub: load the same weights in ComfyUI.",
    "variant": "which weight files diffusers downloads: ComfyUI loads the model file you give it.",
    "cache_dir": "where diffusers keeps downloads: ComfyUI loads models from its models folder.",
    "max_sequence_length": "this pack encodes prompts with the T5 encoder ComfyUI loads, at its own length.",
    "num_validation_images": "this pack renders each validation prompt once per check (validation.seed).",
    "sample_batch_size": "only for generating class images, which this pack does not do while training.",
    "prior_generation_precision": "only for generating class images, which this pack does not do while training.",
    "dataloader_num_workers": "this pack encodes the photos once, before training (cached).",
    "cache_latents": "this pack always caches latents.",
    "mixed_precision": "this pack computes in the precision of the model ComfyUI loads (load bf16 weights for bf16).",
    "allow_tf32": "ComfyUI's PyTorch settings decide TF32.",
    "report_to": "this pack writes loss.png and loss_history.csv into the run folder.",
    "logging_dir": "this pack writes loss.png and loss_history.csv into the run folder.",
    "push_to_hub": "this pack uploads nothing: the LoRA is written to save.output.",
    "hub_model_id": "this pack uploads nothing: the LoRA is written to save.output.",
    "hub_token": "not used (this pack uploads nothing); keep tokens out of files you share.",
    "local_rank": "this pack trains on one GPU.", "enable_npu_flash_attention": "attention is ComfyUI's own.",
}
TEXT_ENCODER = ("train_text_encoder", "text_encoder_lr", "adam_weight_decay_text_encoder")
WEIGHTING = {"logit_normal": ("logit_normal", "none"), "mode": ("mode", "none"),  # -> (our σ sampling, loss weighting)
             "sigma_sqrt": ("uniform", "sigma_sqrt"), "cosmap": ("uniform", "cosmap"), "none": ("uniform", "none")}
BOOLEANS = ("prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup")
OPTIMIZER_ARGS = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps", "prodigy_beta3": "beta3",
                  "prodigy_decouple": "decouple", "prodigy_use_bias_correction": "use_bias_correction",
                  "prodigy_safeguard_warmup": "safeguard_warmup"}
DEFAULTS = [  # (flag, diffusers' default as the user reads it, our key): where the two differ
    ("rank", "4", "layers.rank"), ("lora_alpha", "4", "layers.alpha"), ("train_batch_size", "4", "train.batch_size"),
    ("guidance_scale", "3.5", "train.guidance"), ("lr_warmup_steps", "500", "train.warmup_steps"),
    ("weighting_scheme", "none (uniform σ)", "train.timesteps.mode"), ("checkpointing_steps", "500", "save.every"),
    ("lora_layers", "every layer of the double blocks, attn.to_q/k/v of the single ones", "layers.preset"),
    ("resolution", "512, cropped square", "dataset.bucketing"), ("checkpoints_total_limit", "none", "save.keep_last"),
]
TOP_LEVEL = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",  # FLUX's modules outside the blocks
             *(f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "guidance", "text") for i in (1, 2)))
KNOWN = (set(SWITCHES) | set(SAME) | set(NOTES) | set(TEXT_ENCODER) | set(OPTIMIZER_ARGS) | {d[0] for d in DEFAULTS}
         | {"pretrained_model_name_or_path", "dataset_name", "dataset_config_name", "image_column", "caption_column",
            "class_data_dir", "instance_prompt", "class_prompt", "prior_loss_weight", "num_class_images", "seed",
            "validation_prompt", "validation_epochs", "lora_dropout", "num_train_epochs", "resume_from_checkpoint",
            "optimizer", "logit_mean", "logit_std", "mode_scale", "resolution", "output_dir"})


def read(text: str, source: Path) -> Imported:
    command = parse(text, SWITCHES, str(source))
    f = command.flags
    m = Mapping("diffusers")
    if command.script and command.script != SCRIPT:
        m.notes.append(f"The flags are read as {SCRIPT}'s; {command.script} may take them differently.")
    for flag, value in command.launcher.items():
        if flag == "mixed_precision" and flag not in f:
            f[flag] = value
        else:
            m.note(f"accelerate --{flag}", "an option of accelerate launch: this pack trains on one GPU in ComfyUI.")
    for word in command.strays:
        m.drop(word, "a value with no flag before it (the script refuses it): put its flag before it, or remove it.")
    for flag in list(f):
        if flag not in KNOWN:
            m.drop(f"--{flag}", f"not a flag of {SCRIPT}{suggest(f'--{flag}', [f'--{k}' for k in KNOWN]) or '.'}")
        elif f[flag] is None and flag not in SWITCHES:
            m.drop(f"--{flag}", "it has no value; give one (--flag=value).")
    f = {k: v for k, v in f.items() if k in KNOWN and (v is not None or k in SWITCHES)}
    _plain(m, f)
    _dataset(m, f, source)
    _steps(m, f, source)
    _optimizer(m, f)
    _sigmas(m, f)
    _layers(m, f)
    _defaults(m, f)
    return m.finish("diffusers", source, {f"--{k}": v for k, v in f.items()})


def _plain(m: Mapping, f: dict) -> None:
    for flag, ours in SAME.items():
        if flag in f:
            m.set(f"--{flag}", ours, [f[flag]] if ours == "dataset.folders" else f[flag])
    for flag, text in NOTES.items():
        if flag in f:
            m.note(f"--{flag}", text)
    if "pretrained_model_name_or_path" in f:
        m.note("--pretrained_model_name_or_path", f"diffusers trains on {f['pretrained_model_name_or_path']}: load "
                                                  "that model in ComfyUI and train on it (nothing is downloaded here).")
    if "output_dir" in f:
        m.note("--output_dir", "this pack writes the LoRA in kohya's names, which ComfyUI loads (save.format "
                               "diffusers writes diffusers' names, as the script does).")
    if "seed" in f:
        m.set("--seed", "train.seed", f["seed"])
        m.set("--seed", "validation.seed", f["seed"])
    if "validation_prompt" in f:
        m.set("--validation_prompt", "validation.prompts", [f["validation_prompt"]])
    if "gradient_checkpointing" in f:
        m.set("--gradient_checkpointing", "train.memory.checkpointing", "blocks")
    if "upcast_before_saving" in f:
        m.set("--upcast_before_saving", "save.dtype", "fp32")
    if "resume_from_checkpoint" in f:
        m.drop("--resume_from_checkpoint", "resume a run of this pack with `python -m trainer train … --resume latest` "
                                           "(or a run folder); diffusers' checkpoints can't be continued here.")
    if "lora_dropout" in f:
        if _number(f["lora_dropout"]) == 0:
            m.same("--lora_dropout")
        else:
            m.set("--lora_dropout", "layers.dropout", f["lora_dropout"])  # no such key yet: unsupported by name
    if "train_text_encoder" in f:  # unsupported by name until the library trains the text encoder
        m.set("--train_text_encoder", "train.text_encoder_lr", f.get("text_encoder_lr", 5e-6))
    for flag in TEXT_ENCODER[1:]:
        if flag in f and "train_text_encoder" not in f:
            m.note(f"--{flag}", "diffusers uses it only with --train_text_encoder.")
        elif flag == "text_encoder_lr" and flag in f:
            m.set("--text_encoder_lr", "train.text_encoder_lr", f[flag])
        elif flag in f:
            m.drop(f"--{flag}", "the text encoder's weight decay: this pack does not train the text encoder yet.")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dataset(m: Mapping, f: dict, source: Path) -> None:
    if "dataset_name" in f:
        folder = resolve(f["dataset_name"], source.parent)
        if folder.is_dir():
            m.set("--dataset_name", "dataset.folders", [f["dataset_name"]])
            column = f.get("caption_column")
            m.set("--dataset_name", "dataset.captions", "metadata" if column else "txt")
        else:
            m.drop("--dataset_name", f"{f['dataset_name']!r} is not a folder here ({folder}); for a dataset on the "
                                     "Hugging Face Hub, download it (its images and metadata.jsonl) into a folder and "
                                     "give that folder.")
    for flag, named in (("caption_column", ("text", "caption", "prompt")), ("image_column", ("image", "file_name"))):
        if flag in f and "dataset_name" not in f:
            m.note(f"--{flag}", "diffusers uses it only with --dataset_name.")
        elif flag in f:
            (m.same(f"--{flag}") if f[flag] in named else
             m.drop(f"--{flag}", f"this pack reads a metadata file's {' or '.join(named)} column."))
    if "dataset_config_name" in f:
        m.drop("--dataset_config_name", "a configuration of a Hub dataset, which this pack does not download.")
    if "instance_prompt" in f:
        m.set("--instance_prompt", "dataset.default_caption", f["instance_prompt"],
              note="the caption of every photo without one in the metadata file (dataset.default_caption), as in "
                   "diffusers." if "caption_column" in f and "dataset_name" in f else
              "every photo trains with this caption, as in diffusers (dataset.default_caption).")
        m.set("--instance_prompt", "dataset.trigger", "",
              note="the caption trains as written; set dataset.trigger to its rare word to use [trigger] in prompts.")
    prior = [k for k in ("class_data_dir", "class_prompt", "prior_loss_weight", "num_class_images") if k in f]
    if "with_prior_preservation" not in f:
        for flag in prior:
            m.note(f"--{flag}", "diffusers uses it only with --with_prior_preservation.")
    elif not {"class_data_dir", "class_prompt"} <= f.keys():
        m.drop("--with_prior_preservation", "diffusers needs --class_data_dir and --class_prompt with it.")
        for flag in prior:
            m.note(f"--{flag}", "not used: --with_prior_preservation lacks --class_data_dir or --class_prompt.")
    else:
        m.set("--with_prior_preservation", "dataset.regularisation", [f["class_data_dir"]],
              note="the class photos train beside yours, without the trigger, their loss weighted by "
                   "dataset.regularisation_weight (diffusers' --prior_loss_weight).")
        m.same("--class_data_dir")
        m.origins["dataset.regularisation"] = "--class_data_dir"  # a missing folder is told by this flag
        m.set("--class_prompt", "dataset.regularisation_caption", f["class_prompt"])
        if "prior_loss_weight" in f:
            m.set("--prior_loss_weight", "dataset.regularisation_weight", f["prior_loss_weight"])
        if "num_class_images" in f:
            m.note("--num_class_images", "diffusers generates class photos up to this many; this pack trains the "
                                         "folder's photos as they are (make more with the Class Images node).")
    size = f.get("resolution")
    if "resolution" in f:
        m.set("--resolution", "dataset.resolution", [size],
              note=f"diffusers crops every photo to a {size}×{size} square (dataset.bucketing false); set "
                   "dataset.bucketing true to keep each photo's aspect ratio instead.")
    if "resolution" in f or "center_crop" in f:
        key = "--center_crop" if "center_crop" in f else "--resolution"
        m.set(key, "dataset.bucketing", False)
        m.set(key, "dataset.crop", "center" if "center_crop" in f else "random")


def _photos(folder: Path) -> int:
    return sum(p.suffix.lower() in EXTENSIONS for p in folder.iterdir()) if folder.is_dir() else 0


def _steps(m: Mapping, f: dict, source: Path) -> None:
    """Steps from epochs as the script counts them, and --validation_epochs in steps."""
    flag = "instance_data_dir" if "instance_data_dir" in f else "dataset_name"
    per_epoch, why = None, f"diffusers counts steps from the photos of --{flag}"
    if flag in f:
        photos = _photos(resolve(f[flag], source.parent)) * int(_number(f.get("repeats", 1)) or 1)
        if "with_prior_preservation" in f and "class_data_dir" in f:
            classes = _photos(resolve(f["class_data_dir"], source.parent))
            photos = max(photos, min(classes, int(_number(f.get("num_class_images", 100)) or 100)))
        batch, accumulate = _number(f.get("train_batch_size", 4)), _number(f.get("gradient_accumulation_steps", 1))
        if photos and batch and accumulate and batch >= 1 and accumulate >= 1:
            per_epoch = math.ceil(math.ceil(photos / int(batch)) / int(accumulate))
            why = f"an epoch is {per_epoch} step{'s' * (per_epoch != 1)} ({photos} photos, batches of {int(batch)})"
    epochs = _number(f.get("num_train_epochs"))
    if "num_train_epochs" in f and "max_train_steps" in f:
        m.same("--num_train_epochs", "--max_train_steps decides the steps, as in diffusers.")
    elif "num_train_epochs" in f:
        if per_epoch and epochs and epochs >= 1:
            steps = int(epochs) * per_epoch
            m.set("--num_train_epochs", "train.steps", steps, note=f"{why}: {int(epochs)} epochs are {steps} steps.")
        else:
            m.drop("--num_train_epochs", f"{why}, and the folder is not here or holds none; give --max_train_steps.")
    if "validation_epochs" in f and "validation_prompt" not in f:
        m.note("--validation_epochs", "diffusers uses it only with --validation_prompt.")
    elif "validation_epochs" in f:
        every = _number(f["validation_epochs"])
        if per_epoch and every and every >= 1:
            m.set("--validation_epochs", "validation.every", int(every) * per_epoch, note=f"{why}.")
        else:
            m.drop("--validation_epochs", f"{why}, and the folder is not here or holds none; set validation.every.")


def _optimizer(m: Mapping, f: dict) -> None:
    name = str(f.get("optimizer", "AdamW")).lower()
    if "optimizer" in f and name not in ("adamw", "prodigy"):
        m.set("--optimizer", "train.optimizer", "adamw", note=f"diffusers knows AdamW and prodigy, and trains "
                                                              f"{f['optimizer']!r} as AdamW.")
        name = "adamw"
    elif "optimizer" in f:
        m.set("--optimizer", "train.optimizer", name)
    if "use_8bit_adam" in f:
        if name == "adamw":
            m.set("--use_8bit_adam", "train.optimizer", "adamw8bit")
        else:
            m.note("--use_8bit_adam", "diffusers uses it only with --optimizer AdamW.")
    args, used = {}, []
    for flag in (k for k in OPTIMIZER_ARGS if k in f):
        if name != "prodigy" and flag.startswith("prodigy_"):
            m.note(f"--{flag}", "diffusers uses it only with --optimizer prodigy.")
        elif flag in BOOLEANS:
            args[OPTIMIZER_ARGS[flag]] = bool(f[flag])  # argparse's type=bool: any text but "" is true
            used.append(flag)
            if str(f[flag]).strip().lower() in ("false", "0", "no", "off"):
                m.note(f"--{flag}", f"diffusers reads {f[flag]!r} as true (argparse's type=bool), and so does this.")
        elif _number(f[flag]) is None:
            m.drop(f"--{flag}", f"it is {f[flag]!r}; give a number.")
        else:
            key = OPTIMIZER_ARGS[flag]
            args[key] = (_number(f.get("adam_beta1", 0.9)), _number(f.get("adam_beta2", 0.999))) if key == "betas" \
                else _number(f[flag])
            used.append(flag)
    if used:
        m.set(f"--{used[0]}", "train.optimizer_args", args)
        for flag in used[1:]:
            m.same(f"--{flag}")
    if "scale_lr" in f:
        lr = _number(f.get("learning_rate", 1e-4)) or 1e-4
        scale = int(_number(f.get("gradient_accumulation_steps", 1)) or 1) * int(_number(f.get("train_batch_size", 4))
                                                                                 or 1)
        m.set("--scale_lr", "train.learning_rate", lr * scale,
              note=f"diffusers multiplies the learning rate by accumulation × batch size (× GPUs): {lr * scale:g}.")


def _sigmas(m: Mapping, f: dict) -> None:
    scheme = f.get("weighting_scheme")
    if scheme is not None:
        if scheme not in WEIGHTING:
            m.drop("--weighting_scheme", f"it is {scheme!r}; diffusers takes {', '.join(WEIGHTING)}.")
        else:
            sampling, weighting = WEIGHTING[scheme]
            m.set("--weighting_scheme", "train.timesteps.mode", sampling)
            m.set("--weighting_scheme", "train.loss.weighting", weighting)
    for flag, used in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"), ("mode_scale", "mode")):
        if flag not in f:
            continue
        if scheme != used:
            m.note(f"--{flag}", f"diffusers uses it only with --weighting_scheme {used}.")
        elif flag == "logit_mean" and _number(f[flag]):
            mean = _number(f[flag])
            m.set("--logit_mean", "train.timesteps.logit_mean", -mean,
                  note=f"diffusers' σ is 1 − u of its draw, so its logit_mean {mean:g} is {-mean:g} here: the same σ.")
        else:
            m.set(f"--{flag}", f"train.timesteps.{flag}", f[flag])


def _layers(m: Mapping, f: dict) -> None:
    """--lora_layers: each name is every module whose path ends in it (peft's target_modules)."""
    if "lora_layers" not in f:
        return
    types, outside, unknown = [], [], []
    for name in (n.strip() for n in str(f["lora_layers"]).split(",") if n.strip()):
        found = [t for blocks in VOCABULARY.layers.values() for t in blocks if t == name or t.endswith(f".{name}")]
        types += [t for t in dict.fromkeys(found) if t not in types]
        top = [t for t in TOP_LEVEL if t == name or t.endswith(f".{name}")]
        outside += top
        if not found and not top:
            unknown.append(name)
    if not types:
        m.drop("--lora_layers", f"it names no layer of FLUX's blocks ({f['lora_layers']!r}); this pack trains "
                                "LoRAs in the blocks (attn.to_q, proj_out, ff.net.0.proj, …).")
        return
    m.set("--lora_layers", "layers.layer_types", types, note="each name is that layer in every block that has it, as "
                                                             "peft matches them.")
    if outside:
        m.note("--lora_layers", f"diffusers also trains the model's {', '.join(outside)} outside the blocks; this pack "
                                "trains LoRAs in the blocks only.")
    if unknown:
        m.note("--lora_layers", f"{', '.join(unknown)} names no layer of FLUX (diffusers skips it too).")


def _defaults(m: Mapping, f: dict) -> None:
    """One note for the flags the file leaves out where diffusers' default is not this pack's."""
    ours = Recipe()
    left = [f"--{flag} {theirs} (here {key} {json.dumps(value_of(ours, key))})" for flag, theirs, key in DEFAULTS
            if flag not in f and key not in m.settings]
    if left:
        m.notes.append("Not in the file, so this pack's defaults apply where diffusers' differ: " + "; ".join(left)
                       + ". Add the flags to train as diffusers would.")
