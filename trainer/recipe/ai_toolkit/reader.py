"""ai-toolkit's job YAML (ostris/ai-toolkit: `config/examples/train_lora_flux_24gb.yaml`, and what
its UI writes) read as our recipe, key by key:

    job: extension
    config:
      name: my_lora                        -> save.name
      process:
        - type: sd_trainer                 (ui_trainer: the UI's)
          trigger_word, training_folder, network, save, datasets, train, model, sample
    meta: {…}

Names, defaults and meanings are ai-toolkit's own (toolkit/config_modules.py and its trainer).
Where the file leaves out a key whose ai-toolkit default differs from ours (lr 1e-6, timestep_type
sigmoid, save_every 1000, …), the recipe takes ai-toolkit's and a note lists them: the recipe is
the run ai-toolkit would have made. Every key is honoured, noted, or unsupported with the reason.
The train and datasets sections are read in `train` and `datasets`; `writer` writes a job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .. import quantization
from ..importing import Imported, is_windows_path
from . import layers
from .datasets import read_datasets
from .job import TOOL, Job, item, join, num
from .train import read_train

TRAINERS = ("sd_trainer", "ui_trainer", "diffusion_trainer")
EXPONENT = re.compile(r"^[-+]?\d[\d_]*(\.[\d_]*)?[eE][-+]?\d+$")  # a number to ai-toolkit's loader, text to PyYAML
SAVE_DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
               "fp32": "fp32", "float32": "fp32", "float": "fp32"}
QUANTIZED = ("in ComfyUI load the model with the Load Diffusion Model node's weight_dtype fp8_e4m3fn to train on "
             "8-bit weights as ai-toolkit's quantize does (GGUF models load for rendering, not training)")


def plain(data: Any, name: str | None, notes: list[str]) -> Any:
    """The file as ai-toolkit reads it: `[name]` replaced by config.name everywhere, and `1e-4`
    a number (ai-toolkit's YAML loader reads it so; PyYAML reads text)."""
    if isinstance(data, dict):
        return {k: plain(v, name, notes) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v, name, notes) for v in data]
    if isinstance(data, str):
        if EXPONENT.match(data.strip()):
            return float(data.replace("_", ""))
        if "${" in data:
            notes.append(f"{data!r} names an environment variable, which ai-toolkit fills in; this pack reads "
                         "the text as written.")
        return data.replace("[name]", name) if name else data
    return data


def read(data: Any, source: Path) -> Imported:
    """An ai-toolkit job YAML (parsed) as our recipe, with what became of each of its keys."""
    job = Job()
    m = job.m
    config = data.get("config")
    root, base = (config, "config") if isinstance(config, dict) else (data, "")
    if not isinstance(config, dict) and "config" in data:
        m.note("config", "it is empty, and name and process sit at the top level: ai-toolkit reads them under "
                         "config: and refuses this file (indent them under config:); read as if they were.")
    name = root.get("name")
    data = plain(data, name if isinstance(name, str) else None, m.notes)
    root = data["config"] if base else data
    kind = data.get("job")
    if "job" in data:
        job.only("job", kind, ("extension", "train"), f"job {kind!r} is not a training job; this pack reads "
                                                      "ai-toolkit's extension jobs (sd_trainer)")
    else:
        m.notes.append("The file has no `job: extension` line, which ai-toolkit needs; read as if it had.")
    if name is not None:
        job.set(join(base, "name"), "save.name", name)
    if "meta" in data:
        m.note("meta", "ai-toolkit writes it into its saved files; the LoRA saved here carries its recipe instead.")
    processes = root.get("process")
    processes = processes if isinstance(processes, list) else []
    pbase = join(base, "process")
    trainers = [i for i, p in enumerate(processes) if isinstance(p, dict) and p.get("type") in TRAINERS]
    if not trainers:
        m.drop(pbase, f"no training process (type {' or '.join(TRAINERS)}): nothing to train")
    for i, process in enumerate(processes):
        key = item(pbase, processes, i)
        if trainers and i == trainers[0]:
            read_process(job, process, key)
        else:
            m.drop(key, "this pack trains one sd_trainer process per recipe; make a recipe of each")
    if job.defaults:
        m.notes.append("Left out of the file, so ai-toolkit's defaults: " + "; ".join(job.defaults) + ".")
    return m.finish(TOOL, source, data)


def read_process(job: Job, p: dict, base: str) -> None:
    m = job.m
    m.same(join(base, "type"))
    folder = p.get("training_folder")
    if isinstance(folder, str) and is_windows_path(folder):
        m.note(join(base, "training_folder"), f"{folder!r} is a Windows path (the file comes from another machine): "
                                              "runs go to save.output's default here; set save.output.")
    elif folder is not None:
        job.set(join(base, "training_folder"), "save.output", job.path(join(base, "training_folder"), str(folder)))
    if "sqlite_db_path" in p:
        m.note(join(base, "sqlite_db_path"), "the ai-toolkit UI's job database: not used here.")
    if "device" in p:
        m.same(join(base, "device"), "ComfyUI chooses the device here.")
    if "performance_log_every" in p:
        m.same(join(base, "performance_log_every"), "every progress line here has the step time.")
    if p.get("trigger_word") is not None:
        job.set(join(base, "trigger_word"), "dataset.trigger", str(p["trigger_word"]))
    for name in ("network", "save", "datasets", "train", "model", "sample", "logging"):
        if name in p and not p[name]:
            m.same(join(base, name), None)  # empty: ai-toolkit's defaults, as below
    read_save(job, p["save"] if isinstance(p.get("save"), dict) else {}, join(base, "save"))  # its defaults apply
    sections = {"network": read_network, "model": read_model, "logging": read_logging}
    for name, reader in sections.items():
        if isinstance(p.get(name), dict):
            reader(job, p[name], join(base, name))
    train = p.get("train") if isinstance(p.get("train"), dict) else {}
    read_train(job, train, join(base, "train"))
    datasets = p.get("datasets")
    read_datasets(job, [d for d in datasets if isinstance(d, dict)] if isinstance(datasets, list) else [],
                  join(base, "datasets"), p.get("trigger_word"))
    job.default("dataset.trigger", "", "trigger_word: none, so captions train as written")
    if isinstance(p.get("sample"), dict):
        read_sample(job, p["sample"], join(base, "sample"), bool(train.get("disable_sampling")))


def read_network(job: Job, net: dict, base: str) -> None:
    m = job.m
    kind = str(net.get("type", "lora")).lower()
    key = join(base, "type")
    if "type" in net:
        if kind in ("lora", "locon"):
            job.planned(key, "layers.variant", "lora", "lora",
                        "locon adds LoRAs on conv layers, and FLUX's blocks have none: a LoRA" if kind == "locon"
                        else None)
        elif kind in ("lokr", "dora"):
            job.planned(key, "layers.variant", kind, "lora")
        else:
            m.drop(key, f"{kind} networks are not trained here (lora is; lokr and dora are planned)")
    rank_key = "rank" if "rank" in net else "linear"  # ai-toolkit: rank, kept for old files, wins over linear
    rank = net.get(rank_key, 4)
    if rank_key in net:
        job.set(join(base, rank_key), "layers.rank", rank)
        if rank_key == "rank" and "linear" in net:
            m.same(join(base, "linear"), "rank is given too, and ai-toolkit takes rank.")
    else:
        job.default("layers.rank", 4, "linear")
    for name in ("linear_alpha", "alpha"):
        if name in net and kind != "lokr":
            alpha = net[name]
            job.set(join(base, name), "layers.alpha", 0.0, None if num(alpha) == num(rank) else (
                f"ai-toolkit saves FLUX LoRAs in peft format, which has no alpha, so it trains them with alpha = rank "
                f"({rank}) whatever {name} says; so does this recipe (layers.alpha 0 = rank). Set layers.alpha: "
                f"{alpha} for the scale {name} names."))
        elif name in net:
            m.same(join(base, name), "a full-rank LoKr has no alpha to set.")
    for name in ("conv", "conv_alpha"):
        if name in net:
            m.same(join(base, name), "FLUX's blocks have no conv layers: ai-toolkit trains none for FLUX either."
                   if name == "conv" else None)
    for name, ours in (("lokr_full_rank", "layers.lokr_full_rank"), ("lokr_factor", "layers.lokr_factor")):
        if name in net:
            if kind == "lokr":
                job.set(join(base, name), ours, net[name])
            else:
                m.same(join(base, name), "used only with network.type lokr.")
    if "dropout" in net:
        job.only(join(base, "dropout"), net["dropout"], (None, 0, 0.0), "LoRA dropout is not done here")
    if "transformer_only" in net:
        job.only(join(base, "transformer_only"), net["transformer_only"], (True,),
                 "LoRAs outside FLUX's blocks (embedders, final layer) are not trained here")
    kwargs = net.get("network_kwargs") if isinstance(net.get("network_kwargs"), dict) else {}
    only, ignore = kwargs.get("only_if_contains"), kwargs.get("ignore_if_contains")
    chosen = layers.selected(only, ignore)
    keys = [join(base, f"network_kwargs.{k}") for k, v in (("only_if_contains", only), ("ignore_if_contains", ignore))
            if v is not None]
    if not chosen:
        for k in keys:
            m.drop(k, "the filters leave no layer of FLUX's blocks to train")
        return
    settings = layers.to_settings(chosen, int(num(rank)))
    if settings == {"layers.layer_types": layers.all_types()}:
        for ours, value in settings.items():
            job.default(ours, value, "a LoRA on every linear layer of FLUX's blocks",
                        f"all {len(value)} layer types, the modulation layers norm1.linear and norm.linear too")
        for k in keys:
            m.same(k)
        return
    for k in keys:
        for ours, value in settings.items():
            job.set(k, ours, value)
    shown = {k: v for k, v in settings.items() if k != "layers.groups"}
    told = (f"{len(settings['layers.groups'])} layers.groups" if "layers.groups" in settings
            else ", ".join(f"{k} {v}" for k, v in shown.items()))
    m.notes.append(f"{' and '.join(keys)}: {len(chosen)} of the {len(layers.every_layer())} linear layers of "
                   f"FLUX's blocks, as {told}.")


def read_save(job: Job, save: dict, base: str) -> None:
    m = job.m
    if "dtype" in save:
        job.set(join(base, "dtype"), "save.dtype", SAVE_DTYPES.get(str(save["dtype"]).lower(), save["dtype"]))
    for name, ours, default in (("save_every", "save.every", 1000), ("max_step_saves_to_keep", "save.keep_last", 5)):
        if name in save:
            job.set(join(base, name), ours, save[name])
        else:
            job.default(ours, default, name)
    if "save_format" in save:
        m.same(join(base, "save_format"), "ai-toolkit uses it for whole-model saves; a LoRA is one .safetensors file "
                                          "either way (save.format: kohya or diffusers keys).")
    pushed = bool(save.get("push_to_hub"))
    for name in ("push_to_hub", "hf_repo_id", "hf_private"):
        if name in save:
            job.only(join(base, name), pushed, (False,), "uploading to the Hugging Face Hub is not done here; "
                                                         "upload the LoRA file yourself")


def read_model(job: Job, model: dict, base: str) -> None:
    m = job.m
    if "name_or_path" in model:
        m.note(join(base, "name_or_path"), f"load this model in ComfyUI ({model['name_or_path']}) and connect it to "
                                           "the trainer: ComfyUI's loader gives the weights here.")
    arch = str(model.get("arch") or "").split(":")[0]
    if "arch" in model:
        job.only(join(base, "arch"), arch, ("flux", "flex1"), f"arch {arch!r}: this pack trains FLUX.1 (arch flux)")
    if "is_flux" in model:
        job.only(join(base, "is_flux"), bool(model["is_flux"]) or arch in ("flux", "flex1"), (True,),
                 "this pack trains FLUX.1 (is_flux: true)")
    if "quantize" in model:
        quantization.honour(m, "ai-toolkit", "model.quantize", join(base, "quantize"), bool(model["quantize"]))
    for name in ("quantize_te", "qtype", "qtype_te"):
        if name in model:
            on = bool(model.get(name.replace("qtype", "quantize"), False))
            text = ("the T5 text encoder: ComfyUI's DualCLIPLoader takes an fp8 t5xxl file the same way" if "te" in name
                    else QUANTIZED)
            m.note(join(base, name), (text if on else "ai-toolkit keeps these weights unquantized; so does ComfyUI "
                                      "when the model loads in its own precision (weight_dtype default)") + ".")
    for name in ("low_vram", "layer_offloading"):
        if name in model:
            m.note(join(base, name), "ComfyUI manages the model's memory here; train.memory.swap_blocks keeps blocks "
                                     "in CPU memory while training.")
    if "dtype" in model:
        m.same(join(base, "dtype"), "ai-toolkit replaces it by train.dtype.")
    if "model_kwargs" in model:
        job.only(join(base, "model_kwargs"), model["model_kwargs"] or None, (None,),
                 "extra model arguments are not passed here")
    for name in ("lora_path", "assistant_lora_path", "inference_lora_path"):
        if name in model:
            job.only(join(base, name), model[name] or None, (None,), "a LoRA merged into the model while training "
                     "is not applied here; apply it with a LoraLoader before the trainer")


def read_sample(job: Job, sample: dict, base: str, disabled: bool) -> None:
    m = job.m
    if "sampler" in sample:
        job.only(join(base, "sampler"), str(sample["sampler"]), ("flowmatch",),
                 "FLUX samples with flowmatch (the flow Euler sampler) here")
    prompts = [str(p) for p in sample.get("prompts") or []]
    samples = sample.get("samples") if isinstance(sample.get("samples"), list) else []
    for i, entry in enumerate(samples):
        key = item(join(base, "samples"), samples, i)
        for name in (entry if isinstance(entry, dict) else {}):
            if name == "prompt":
                prompts.append(str(entry["prompt"]))
            else:
                m.drop(join(key, name), "per-prompt settings are not kept: every sample uses validation's")
    for name in ("prompts", "samples"):
        if name in sample:
            job.set(join(base, name), "validation.prompts", [] if disabled else prompts,
                    "train.disable_sampling is true: not rendered." if disabled and prompts else None)
    for name, ours, default in (("sample_every", "validation.every", 100), ("seed", "validation.seed", 0),
                                ("guidance_scale", "validation.guidance", 7.0),
                                ("sample_steps", "validation.steps", 20)):
        if name in sample:
            job.set(join(base, name), ours, sample[name])
        else:
            job.default(ours, default, name)
    width, height = sample.get("width", 512), sample.get("height", 512)
    if "width" in sample or "height" in sample:
        key = join(base, "width" if "width" in sample else "height")
        job.set(key, "validation.size", width)
        if "height" in sample and "width" in sample and height != width:
            m.note(join(base, "height"), f"samples are square here (validation.size {width}).")
        elif "height" in sample and "width" in sample:
            m.same(join(base, "height"))
    else:
        job.default("validation.size", 512, "width and height")
    if "walk_seed" in sample:
        m.same(join(base, "walk_seed"), "ai-toolkit renders prompt i with seed + i; here every prompt renders with "
               "validation.seed." if sample["walk_seed"] else None)
    if "neg" in sample:
        m.same(join(base, "neg"), "FLUX.1 [dev] renders without a negative prompt (ai-toolkit's own FLUX example: "
               "'not used on flux'): not used." if sample["neg"] else None)
    for name, fine in (("num_frames", (1,)), ("fps", None), ("format", None), ("network_multiplier", (1, 1.0)),
                       ("guidance_rescale", (0, 0.0)), ("sample_start_step", (0,))):
        if name in sample:
            if fine is None:
                m.same(join(base, name), "samples are PNG stills here.")
            else:
                job.only(join(base, name), sample[name], fine, f"{name} {sample[name]!r}: samples here are stills "
                         "of the whole LoRA from the first step")


def read_logging(job: Job, logging: dict, base: str) -> None:
    m = job.m
    for name in logging:
        if name == "use_wandb":
            job.only(join(base, name), bool(logging[name]), (False,), "no Weights & Biases logging here: each run "
                     "folder has loss_history.csv and loss.png")
        elif name == "log_every":
            m.note(join(base, name), "progress lines come every --log-every steps (python -m trainer train).")
        elif name in ("verbose", "project_name", "run_name", "use_ui_logger"):
            m.same(join(base, name))
