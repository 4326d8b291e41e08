"""mflux's train config (the JSON of its DreamBooth guide, `mflux-train --train-config`) as a recipe.

What each key does in mflux, as its code does it (src/mflux/dreambooth):

- an epoch is every example once, shuffled, in batches of `batch_size` (the last one smaller), so
  `steps = num_epochs × ⌈examples / batch_size⌉`;
- `steps`, `guidance` and `seed` are the settings of its validation images; the guidance is also
  what the model is told while training, and the training noise level is one of those `steps`;
- every photo is resized to exactly `width × height`;
- the optimizer is mlx's Adam or AdamW, whose weight decay is 0.01 unless told otherwise;
- `examples.path` is relative to the config file; its images train with their prompts as written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..families.flux1.layers import MFLUX_NAMES
from ..lora.targets import LayerGroup
from . import quantization
from .importing import Imported, Mapping, missing_note, resolve

MODELS = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell", "krea-dev": "FLUX.1-Krea-dev",
          "dev-fill": "FLUX.1-Fill-dev"}
WEIGHT_DECAY = {"adamw": 0.01, "adam": 0.0}  # mlx's defaults: Adam has none
GROUP_KEYS = ("block_range", "layer_types", "lora_rank", "lora_alpha")


def read(data: dict, source: Path) -> Imported:
    m = Mapping("mflux")
    _model(m, data)
    _generation(m, data)
    images = _examples(m, _block(m, data, "examples"), source)
    _training_loop(m, _block(m, data, "training_loop"), images)
    _optimizer(m, _block(m, data, "optimizer"))
    _save(m, _block(m, data, "save"))
    _instrumentation(m, _block(m, data, "instrumentation"))
    groups = _lora_layers(m, _block(m, data, "lora_layers"))
    return m.finish("mflux", source, data, groups)


def _block(m: Mapping, data: dict, name: str) -> dict:
    block = data.get(name)
    if block is not None and not isinstance(block, dict):
        m.drop(name, f"it is {block!r}; mflux expects a mapping of settings here.")
        return {}
    return block or {}


def _whole(value: Any) -> int | None:
    """A whole number as written (5, 5.0, "5"), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and not isinstance(value, bool) else None


def _model(m: Mapping, data: dict) -> None:
    if "model" in data:
        name = MODELS.get(str(data["model"]), str(data["model"]))
        m.note("model", f"mflux trains on {name}: load that model in ComfyUI and train on it (nothing is "
                        "downloaded here).")
    if "base_model" in data:
        m.note("base_model", f"the model is a fine-tune of {MODELS.get(str(data['base_model']), data['base_model'])}: "
                             "load the fine-tune itself in ComfyUI.")
    if "quantize" in data:
        quantization.honour(m, "mflux", "quantize", "quantize", data["quantize"])

def _generation(m: Mapping, data: dict) -> None:
    """seed, steps, guidance, width, height: mflux's generation settings, used while training too."""
    if "seed" in data:
        m.set("seed", "train.seed", data["seed"])
        m.set("seed", "validation.seed", data["seed"])
    if "steps" in data:
        m.set("steps", "validation.steps", data["steps"],
              note="the sampling steps of mflux's validation images. mflux also draws each training step's noise "
                   "level from that many-step schedule; this pack draws it continuously (train.timesteps).")
    if "guidance" in data:
        m.set("guidance", "train.guidance", data["guidance"],
              note="mflux tells the model this guidance while training and when rendering its validation images; "
                   "both are kept (train.guidance, validation.guidance).")
        m.set("guidance", "validation.guidance", data["guidance"])
    width, height = data.get("width"), data.get("height")
    if width is None and height is None:
        return
    key = "width" if width is not None else "height"
    w, h = _whole(width if width is not None else height), _whole(height if height is not None else width)
    if w is None or h is None:
        m.set(key, "dataset.resolution", [width if width is not None else height])  # its refusal names the key
    elif w == h:
        m.set(key, "dataset.resolution", [w], note=f"mflux resizes every photo to {w}×{h}; this pack crops each to "
                                                   "its centre square at that size (dataset.bucketing false).")
        m.set(key, "dataset.bucketing", False)
    else:
        size = max(64, round(math.sqrt(w * h) / 16) * 16)
        m.set(key, "dataset.resolution", [size], note=f"mflux trains every photo at exactly {w}×{h}; this pack keeps "
                                                      f"each photo's aspect ratio in buckets of about {size}² pixels.")
    for other in ("width", "height"):
        if other in data:
            m.same(other)


def _examples(m: Mapping, examples: dict, source: Path) -> int | None:
    """The photos and prompts: the recipe names this file as its dataset (build reads its examples
    block). Returns how many photos it lists, None when it lists none."""
    if not examples:
        return None
    images, path = examples.get("images"), examples.get("path") or "."
    if not isinstance(images, list) or not images:
        m.drop("examples.images", f"it is {images!r}; list the photos as [{{\"image\": …, \"prompt\": …}}, …].")
        return None
    if source.suffix.lower() != ".json":
        m.drop("examples", f"this pack reads an mflux examples block from a .json file: rename {source.name} to "
                           f"{source.stem}.json.")
        return None
    for i, entry in enumerate(images):
        name = f"examples.images[{i}]" if len(images) > 1 else "examples.images"
        if not isinstance(entry, dict) or not {"image", "prompt"} <= entry.keys():
            m.drop(name, "each photo needs both \"image\" and \"prompt\".")
            continue
        for extra in set(entry) - {"image", "prompt"}:
            m.drop(f"{name}.{extra}", "not a setting this pack knows of an mflux example (image and prompt are).")
    key = "examples.path" if "path" in examples else "examples.images"
    m.set(key, "dataset.folders", [source.name],
          note="the photos of examples.images train with their prompts (dataset.folders names this config file: "
               "its examples block is read as mflux reads it).")
    m.set("examples.images", "dataset.trigger", "",
          note="mflux trains each prompt as written: no trigger word is added (dataset.trigger is empty).")
    folder = resolve(str(path), source.parent)
    if not folder.is_dir():
        m.notes.append(missing_note("examples.path", str(path), folder))
    else:
        absent = [str(e["image"]) for e in images if isinstance(e, dict) and "image" in e
                  and not (folder / str(e["image"])).is_file()]
        if absent:
            m.note("examples.images", f"{len(absent)} of {len(images)} photos are not in {folder}: "
                                      f"{', '.join(absent)}.")
    return sum(isinstance(e, dict) and {"image", "prompt"} <= e.keys() for e in images) or None


def _training_loop(m: Mapping, loop: dict, images: int | None) -> None:
    batch = loop.get("batch_size", 1)
    if "batch_size" in loop:
        m.set("training_loop.batch_size", "train.batch_size", batch)
    if "num_epochs" not in loop:
        return
    epochs, per_step = _whole(loop["num_epochs"]), _whole(batch)
    if epochs is None or epochs < 1 or per_step is None or per_step < 1:
        m.drop("training_loop.num_epochs", f"num_epochs {loop['num_epochs']!r} and batch_size {batch!r} must be "
                                           "whole numbers, at least 1.")
    elif images is None:
        m.drop("training_loop.num_epochs", "mflux counts steps from the photos of examples.images, and the file "
                                           "lists none; set train.steps instead.")
    else:
        per_epoch = math.ceil(images / per_step)
        m.set("training_loop.num_epochs", "train.steps", epochs * per_epoch,
              note=f"{epochs} epochs of {images} photos in batches of {per_step} are {epochs * per_epoch} steps, "
                   "as mflux counts them.")


def _optimizer(m: Mapping, optimizer: dict) -> None:
    if "learning_rate" in optimizer:
        m.set("optimizer.learning_rate", "train.learning_rate", optimizer["learning_rate"])
    if "name" not in optimizer:
        return
    name = str(optimizer["name"])
    decay = WEIGHT_DECAY.get(name.strip().lower())
    if decay is None:
        m.set("optimizer.name", "train.optimizer", name)  # an optimizer this pack lacks is refused by name
        return
    m.set("optimizer.name", "train.optimizer", "adamw")
    m.set("optimizer.name", "train.weight_decay", decay,
          note=f"mlx's {name} decays weights by {decay:g} (train.weight_decay).")


def _save(m: Mapping, save: dict) -> None:
    if "checkpoint_frequency" in save:
        m.set("save.checkpoint_frequency", "save.every", save["checkpoint_frequency"])
    if "output_path" in save:
        m.set("save.output_path", "save.output", str(save["output_path"]),
              note="each run gets its own folder in it (flux_lora_001, …) with its checkpoints and samples.")


def _instrumentation(m: Mapping, instrumentation: dict) -> None:
    if "plot_frequency" in instrumentation:
        m.note("instrumentation.plot_frequency", "this pack plots the loss of every step (loss.png and "
                                                 "loss_history.csv in the run folder).")
    if "generate_image_frequency" in instrumentation:
        m.set("instrumentation.generate_image_frequency", "validation.every",
              instrumentation["generate_image_frequency"])
    if "validation_prompt" in instrumentation:
        prompt = instrumentation["validation_prompt"]
        m.set("instrumentation.validation_prompt", "validation.prompts", [prompt] if isinstance(prompt, str)
              else prompt)


def _lora_layers(m: Mapping, lora_layers: dict) -> list[dict]:
    """One layer group per block group (several for a block_range of scattered indices), in our
    names: mflux's ff.linear1 is diffusers' ff.net.0.proj, its attn.to_out is attn.to_out.0."""
    groups = []
    for blocks, spec in lora_layers.items():
        key = f"lora_layers.{blocks}"
        if not isinstance(spec, dict):
            m.drop(key, f"it is {spec!r}; give block_range, layer_types and lora_rank.")
            continue
        for extra in set(spec) - set(GROUP_KEYS):
            m.drop(f"{key}.{extra}", f"not a setting of an mflux layer group ({', '.join(GROUP_KEYS[:3])}).")
        types = spec.get("layer_types")
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            m.drop(key, f"layer_types is {types!r}; give a list of layer names, e.g. [\"proj_out\"].")
            continue
        ours = [MFLUX_NAMES.get(t, t) for t in types]
        ranges = _ranges(spec.get("block_range"))
        if ranges is None:
            m.drop(key, f"block_range is {spec.get('block_range')!r}; give {{\"start\": …, \"end\": …}} (end "
                        "exclusive) or {\"indices\": […]}.")
            continue
        rank, alpha = spec.get("lora_rank", 16), spec.get("lora_alpha") or 0.0
        try:
            for start, end in ranges:
                LayerGroup(blocks, start, end, tuple(ours), _whole(rank) or 0, alpha or None)
        except (TypeError, ValueError) as e:
            m.drop(key, str(e))
            continue
        m.same(key)
        renamed = [f"{t} is {MFLUX_NAMES[t]}" for t in types if t in MFLUX_NAMES]
        if renamed:
            m.note(key, f"layer_types in diffusers' names, which this pack uses: mflux's {', '.join(renamed)}.")
        groups += [{"blocks": blocks, "start": start, "end": end, "layer_types": ours, "rank": rank, "alpha": alpha}
                   for start, end in ranges]
        for i in range(len(groups) - len(ranges), len(groups)):
            m.origins[f"layers.groups[{i}]"] = key  # a value our format refuses is told by mflux's key
    return groups


def _ranges(block_range: Any) -> list[tuple[int, int]] | None:
    """[(start, end)] of a block_range: {start, end} (end exclusive), or indices as runs of blocks."""
    if not isinstance(block_range, dict):
        return None
    indices = block_range.get("indices")
    if indices:
        numbers = sorted({_whole(i) for i in indices}) if isinstance(indices, list) else [None]
        if None in numbers or numbers[0] < 0:
            return None
        runs, first = [], numbers[0]
        for previous, current in zip(numbers, numbers[1:] + [None]):
            if current != previous + 1:
                runs.append((first, previous + 1))
                first = current
        return runs
    start, end = _whole(block_range.get("start")), _whole(block_range.get("end"))
    return [(start, end)] if start is not None and end is not None else None

