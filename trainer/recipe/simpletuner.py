"""SimpleTuner's config.json (`"--max_train_steps": 10000`, …) read as our recipe, with the files it
names: --data_backend_config (the datasets: simpletuner_data), --lycoris_config and
--user_prompt_library (simpletuner_files). A data-backend file given alone is read as the dataset.

Every key is honoured, told as a note, or reported unsupported with the reason. Keys in no file keep
this pack's defaults: SimpleTuner's own defaults differ between its versions.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ..loop import optimizers
from .importing import Imported, Mapping
from .simpletuner_data import BACKEND_DEFAULTS, read_backends
from .simpletuner_files import (
    ATTENTION,
    FEED_FORWARD,
    NORMS,
    SINGLE_MLP,
    Place,
    load_companion,
    number,
    read_lycoris,
    read_prompts,
)
from .simpletuner_flags import FLAG_READERS, HOUSEKEEPING, Flags, read_simple, told

COMPANIONS = ("data_backend_config", "lycoris_config", "user_prompt_library")


def flags_of(data: dict) -> Flags:
    """name → (key as written, value): `--max_train_steps` and `max_train_steps` alike."""
    return {str(k).lstrip("-").replace("-", "_"): (str(k), v) for k, v in data.items()}


def read(data: Any, source: Path) -> Imported:
    m = Mapping("SimpleTuner")
    place = Place(source.parent)
    if isinstance(data, list):  # a data-backend file on its own
        read_backends(m, source.name, data, {}, place)
        return _finish(m, source, {source.name: data}, place)
    flags = flags_of(data)
    whole: dict[str, Any] = dict(data)
    lycoris = str(flags.get("lora_type", ("", "standard"))[1]).strip().lower() == "lycoris"
    files: dict[str, tuple[str, Any]] = {}
    for name in COMPANIONS:
        if name not in flags:
            continue
        key, value = flags[name]
        if name == "lycoris_config" and not lycoris:
            m.same(key, "used only with --lora_type lycoris")
            continue
        found = load_companion(m, key, value, place)
        if found:
            file_name = found[0] if found[0] not in whole else f"{key}:{found[0]}"
            files[name] = (file_name, found[1])
            whole[file_name] = found[1]
            m.same(key)
    _datasets(m, flags, files.get("data_backend_config"), place)
    _network(m, flags, files.get("lycoris_config"), lycoris)
    _prompts(m, flags, files.get("user_prompt_library"))
    done = set(BACKEND_DEFAULTS) | set(COMPANIONS) | {"lora_type", "lora_rank", "lora_alpha", "flux_lora_target",
                                                      "validation_prompt"}
    housekeeping = []
    for name, (key, value) in flags.items():
        if name in done:
            continue
        if name in HOUSEKEEPING:
            m.same(key)
            housekeeping.append(key)
        elif name in READERS:
            READERS[name](m, flags, key, value, place)
        else:
            read_simple(m, name, key, value)
    if housekeeping:
        m.notes.append(f"{', '.join(housekeeping)}: SimpleTuner's own caching, worker and logging settings; they "
                       "change nothing in what trains.")
    return _finish(m, source, whole, place)


def _finish(m: Mapping, source: Path, whole: dict, place: Place) -> Imported:
    if "dataset.trigger" not in m.settings:
        m.settings["dataset.trigger"] = ""  # no instance_prompt: captions train as written
        m.notes.append("No instance_prompt: captions train as written (dataset.trigger is empty).")
    if place.root is not None and place.root != place.base:
        m.notes.append(f"Relative paths are read from {place.root} (SimpleTuner's folder, above the config's), as "
                       "SimpleTuner does; the recipe writes them relative to the config.")
    m.notes.append("Other settings in no file keep this pack's defaults (SimpleTuner's own differ between its "
                   "versions).")
    return m.finish("simpletuner", source, whole)


def _datasets(m: Mapping, flags: Flags, backends: tuple[str, Any] | None, place: Place) -> None:
    defaults = {name: flags[name] for name in BACKEND_DEFAULTS if name in flags}
    if backends is None:
        used = read_backends(m, None, [], defaults, place)
    elif not isinstance(backends[1], list):
        m.drop(backends[0], f"{backends[0]} holds {type(backends[1]).__name__}, not a list of datasets.")
        used = set()
    else:
        used = read_backends(m, backends[0], backends[1], defaults, place)
    for name, (key, _) in defaults.items():
        if name not in used:
            m.same(key, f"every dataset of {backends[0]} sets its own {name}, which SimpleTuner uses instead"
                   if backends else None)


def _network(m: Mapping, flags: Flags, lycoris_file: tuple[str, Any] | None, lycoris: bool) -> None:
    """--lora_type, --lora_rank, --lora_alpha, --flux_lora_target and the LyCORIS file."""
    rank, alpha, target = (flags.get(n) for n in ("lora_rank", "lora_alpha", "flux_lora_target"))
    sized = False
    if lycoris:
        key = flags["lora_type"][0]
        if lycoris_file:
            m.same(key, "LyCORIS: lycoris_config.json's algo decides the network")
            sized = read_lycoris(m, lycoris_file[0], lycoris_file[1], rank[1] if rank else 16)
        else:
            m.note(key, "LyCORIS without its lycoris_config.json: this recipe trains a plain LoRA.")
        if target:
            m.same(target[0], "used only with --lora_type standard (LyCORIS takes its apply_preset)")
    elif "lora_type" in flags:
        m.same(flags["lora_type"][0])
    fallback = "LyCORIS's network is not in this pack yet: this recipe trains a plain LoRA at this size"
    for flag, ours in ((rank, "layers.rank"), (alpha, "layers.alpha")):
        if flag is None:
            continue
        if sized:
            m.same(flag[0], "SimpleTuner ignores it with --lora_type lycoris (lycoris_config.json sizes the network)")
        elif flag[1] is None:
            m.same(flag[0], "alpha = rank, as here" if ours == "layers.alpha" else None)
        else:
            m.set(flag[0], ours, flag[1], note=fallback if lycoris else None)
    if target and not lycoris:
        _lora_target(m, target[0], str(target[1]).strip(), rank[1] if rank else 16, alpha[1] if alpha else None)
    elif not lycoris:  # SimpleTuner's default target, the same in all its versions
        m.settings["layers.layer_types"] = FLUX_TARGETS["all"]
        m.notes.append("SimpleTuner's default --flux_lora_target all (set in no file): the attention layers.")


CONTEXT = ATTENTION[4:]  # the text stream's attention (add_q/k/v_proj, to_add_out)
FLUX_TARGETS = {  # SimpleTuner's --flux_lora_target → diffusers layer names (each block group takes its own)
    "mmdit": ATTENTION[:4], "all": ATTENTION, "context": CONTEXT, "context+ffs": CONTEXT + FEED_FORWARD[2:],
    "all+ffs": ATTENTION + FEED_FORWARD + SINGLE_MLP, "ai-toolkit": ATTENTION + FEED_FORWARD + SINGLE_MLP + NORMS,
    "all+ffs+embedder": ATTENTION + FEED_FORWARD + SINGLE_MLP,
}
SINGLE_LAYERS = {"tiny": (7, 20), "nano": (7,)}  # single_transformer_blocks.N.proj_out (TheLastBen's)


def _lora_target(m: Mapping, key: str, target: str, rank: Any, alpha: Any) -> None:
    if target in SINGLE_LAYERS:
        groups = [{"blocks": "single_transformer_blocks", "start": n, "end": n + 1, "layer_types": ["proj_out"],
                   "rank": rank, "alpha": alpha or 0} for n in SINGLE_LAYERS[target]]
        blocks = ", ".join(map(str, SINGLE_LAYERS[target]))
        m.set(key, "layers.groups", groups, note=f"proj_out of single block(s) {blocks}")
    elif target in FLUX_TARGETS:
        differs = {"all+ffs": "SimpleTuner's peft also wraps the model's last proj_out; here the blocks' layers only",
                "all+ffs+embedder": "nearest: the blocks' layers; x_embedder is not trained here"}.get(target)
        m.set(key, "layers.layer_types", FLUX_TARGETS[target], note=differs)
    else:
        m.drop(key, f"{target!r}: this pack maps mmdit, all, context, context+ffs, all+ffs, ai-toolkit, tiny and nano "
                    "(ControlNet layers are not trained here).")


def _prompts(m: Mapping, flags: Flags, library: tuple[str, Any] | None) -> None:
    prompts = []
    if "validation_prompt" in flags:
        key, value = flags["validation_prompt"]
        if isinstance(value, str) and value.strip():
            prompts.append((key, value))
        else:
            m.same(key)
    if library:
        prompts += read_prompts(m, library[0], library[1])
    for n, (key, _) in enumerate(prompts):
        m.set(key, "validation.prompts", [p for _, p in prompts]) if n == 0 else m.same(key)


# SimpleTuner's optimizer → (ours, its weight_decay, its defaults that ours takes, what differs)
SIMPLETUNER_OPTIMIZERS = {
    "adamw_bf16": ("adamw", 0.01, {"eps": 1e-6}, "SimpleTuner's bf16 AdamW is PyTorch's AdamW here, with its "
                                                 "weight_decay 0.01 and eps 1e-6"),
    "torch-adamw": ("adamw", 0.01, {}, None),
    "optimi-adamw": ("adamw", 0.0, {"betas": [0.9, 0.99], "eps": 1e-6}, "optimi's AdamW is PyTorch's here, with its "
                                                                        "betas 0.9, 0.99, eps 1e-6, no weight decay"),
    "optimi-stableadamw": ("adamw", 0.01, {"betas": [0.9, 0.99], "eps": 1e-6},
                           "nearest: StableAdamW (update clipping) is PyTorch's AdamW here, with its betas and eps"),
    "bnb-adamw": ("adamw", 0.01, {"eps": 1e-6}, None),
    "bnb-adamw8bit": ("adamw8bit", 0.01, {"eps": 1e-6}, None),
    "adamw8bit": ("adamw8bit", 0.01, {"eps": 1e-6}, None),
    "ao-adamw8bit": ("adamw8bit", 0.01, {"eps": 1e-6}, "nearest: bitsandbytes' AdamW8bit for torchao's"),
    "optimi-lion": ("lion", 0.0, {}, None), "bnb-lion": ("lion", 0.0, {}, None),
    "bnb-lion8bit": ("lion", 0.0, {}, "nearest: Lion with full-precision state"),
    "prodigy": ("prodigy", 0.0, {}, "SimpleTuner's prodigy is Prodigy-plus schedule-free; here prodigyopt's Prodigy "
                                    "(keep learning_rate 1.0)"),
    "adamw_schedulefree": ("adamw_schedulefree", 0.01, {}, None),
    "adafactor": ("adafactor", None, {}, None),
}


def optimizer_config(value: Any) -> dict:
    """--optimizer_config as SimpleTuner reads it: 'eps=1e-6,weight_decay=0.0' (or a mapping)."""
    if isinstance(value, dict):
        return dict(value)
    out = {}
    for pair in str(value or "").split(","):
        name, _, raw = pair.partition("=")
        if name.strip():
            low = raw.strip().lower()
            parsed = {"true": True, "false": False, "none": None}.get(low, number(raw))
            out[name.strip()] = raw.strip() if parsed is None and low != "none" else parsed
    return out


def _optimizer(m, flags, key, value, place):
    names = [flags[n][0] for n in ("optimizer", "optimizer_config", "optimizer_beta1", "optimizer_beta2") if n in flags]
    if any(told(m, k) for k in names):
        return  # read with the first of them
    okey, chosen = flags.get("optimizer", (None, "adamw"))
    chosen = str(chosen or "adamw").strip().lower()
    ours, decay, args, differs = SIMPLETUNER_OPTIMIZERS.get(chosen, (None, None, {}, None)) if okey else \
        ("adamw", None, {}, None)
    if ours is None and "adam" in chosen:
        ours, differs = "adamw", f"nearest: {chosen} is PyTorch's AdamW here"
    if okey and ours is None:
        m.drop(okey, f"{chosen!r} is not in this pack ({', '.join(optimizers.OPTIMIZERS)}; SimpleTuner's adamw_bf16, "
                     "optimi-lion, prodigy … map to them); the recipe keeps adamw.")
    elif okey:
        m.set(okey, "train.optimizer", ours, note=differs)
        if decay is not None:
            m.set(okey, "train.weight_decay", decay)
    args = dict(args)
    if "optimizer_config" in flags:
        ckey, cvalue = flags["optimizer_config"]
        given = optimizer_config(cvalue)
        if "weight_decay" in given:
            m.set(ckey, "train.weight_decay", given.pop("weight_decay"))
        taken = inspect.signature(optimizers.constructor(ours or "adamw")).parameters
        for arg in [a for a in given if a not in taken or a in ("params", "lr")]:
            m.drop(f"{ckey}.{arg}", f"{ours or 'adamw'} here takes no {arg} (it takes "
                                    f"{', '.join(p for p in taken if p not in ('self', 'params', 'lr'))}).")
            given.pop(arg)
        args.update(given)
        m.same(ckey)
    betas = [flags.get(n, (None, None)) for n in ("optimizer_beta1", "optimizer_beta2")]
    if all(number(v) is not None for _, v in betas):
        args["betas"] = [number(v) for _, v in betas]
    for k, _ in betas:
        if k:
            m.same(k, None if all(number(v) is not None for _, v in betas) else "used only with both betas")
    if args:
        m.set(names[0], "train.optimizer_args", args)


def _schedule(m, flags, key, value, place):
    chosen = str(value or "").strip().lower()
    optimizer = str(flags.get("optimizer", ("", ""))[1] or "").strip().lower()
    if "schedulefree" in optimizer:
        m.same(key, f"SimpleTuner runs {optimizer} with a constant schedule, as here")
    elif chosen in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        m.set(key, "train.lr_schedule", chosen)
        if chosen == "polynomial" and "lr_power" not in flags:
            m.set(key, "train.lr_power", 0.8, note="SimpleTuner's polynomial decays with its --lr_power 0.8")
    else:
        m.drop(key, f"{chosen!r} is not in this pack (constant, constant_with_warmup, linear, cosine, "
                    "cosine_with_restarts, polynomial); the recipe keeps constant.")


READERS = {**FLAG_READERS, "lr_scheduler": _schedule,
           **dict.fromkeys(("optimizer", "optimizer_config", "optimizer_beta1", "optimizer_beta2"), _optimizer)}
