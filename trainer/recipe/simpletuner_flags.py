"""The flags of SimpleTuner's config.json besides the datasets and the network: the run's length,
optimizer and schedule, σ sampling, checkpoints, validation, EMA, and what belongs to ComfyUI here
(the model and its precision). `FLAG_READERS[name](m, flags, key, value, place)` reads one flag;
`read_simple` the ones a table says all about."""

from __future__ import annotations

from typing import Any, Callable

from . import quantization
from .importing import Mapping
from .simpletuner_files import Place, number, truthy

Flags = dict[str, tuple[str, Any]]  # name without dashes → (key as written, value)

DIRECT = {  # flags that set one of our keys as written (our format converts and checks the value)
    "train_batch_size": "train.batch_size", "learning_rate": "train.learning_rate",
    "lr_warmup_steps": "train.warmup_steps", "lr_num_cycles": "train.lr_num_cycles", "lr_power": "train.lr_power",
    "lr_end": "train.lr_end", "max_grad_norm": "train.max_grad_norm", "seed": "train.seed",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "checkpointing_steps": "save.every",
    "checkpoint_step_interval": "save.every", "validation_steps": "validation.every",
    "validation_step_interval": "validation.every", "validation_seed": "validation.seed",
    "validation_guidance": "validation.guidance", "validation_num_inference_steps": "validation.steps",
    "flux_guidance_value": "train.guidance", "gradient_checkpointing_interval": "train.memory.checkpoint_every",
    "flow_sigmoid_scale": "train.timesteps.logit_std", "flow_matching_sigmoid_scale": "train.timesteps.logit_std",
}
IN_COMFYUI = "load {value} in ComfyUI: this pack trains the model ComfyUI loaded"
PRECISION = "training runs in the precision of the model as ComfyUI loaded it (bf16 weights are SimpleTuner's bf16)"
TEXT_ENCODERS = "the text encoders are ComfyUI's, as its loader gives them; captions are encoded once"
BUCKETS = "this pack's aspect buckets are its own (1:4 to 4:1, sides multiples of 16)"
FLOW_ONLY = "SimpleTuner applies it only to models that are not flow-matching; FLUX training ignores it"
NOTED = {  # flags that set nothing here, with what to tell the user
    "pretrained_model_name_or_path": IN_COMFYUI, "pretrained_transformer_model_name_or_path": IN_COMFYUI,
    "pretrained_vae_model_name_or_path": "load the VAE {value} in ComfyUI",
    "pretrained_t5_model_name_or_path": "load the T5 text encoder {value} in ComfyUI",
    "model_flavour": "load FLUX.1 {value} in ComfyUI", "revision": IN_COMFYUI, "variant": IN_COMFYUI,
    "mixed_precision": PRECISION, "base_model_default_dtype": PRECISION,
    **{f"text_encoder_{n}_precision": TEXT_ENCODERS for n in (1, 2, 3, 4)},
    "aspect_bucket_rounding": BUCKETS, "aspect_bucket_alignment": BUCKETS,
    "noise_offset": FLOW_ONLY, "noise_offset_probability": FLOW_ONLY, "offset_noise": FLOW_ONLY, "snr_gamma": FLOW_ONLY,
}
HUB = "no Hugging Face upload here: the LoRA is a file in save.output"
SIGMAS = "this pack draws σ by train.timesteps.mode (flux_shift, logit_normal, uniform, …), not by this schedule"
OFF = {  # flags honoured when off; on, unsupported for this reason
    "push_to_hub": HUB, "push_checkpoints_to_hub": HUB,
    "validation_torch_compile": "samples are rendered by this pack's own sampler",
    "controlnet": "this pack trains LoRAs of the transformer, not ControlNets",
    "validation_randomize": "samples use validation.seed every time, to compare steps",
    "flux_attention_masked_training": "this pack trains without T5 attention masking",
    "flux_fast_schedule": SIGMAS, "flow_use_beta_schedule": SIGMAS, "flux_use_beta_schedule": SIGMAS,
    "validation_prompt_library": "SimpleTuner's own prompt library is not here; put prompts in validation.prompts",
    "enable_watermark": "samples here carry no watermark",
}
HOUSEKEEPING = {
    "vae_batch_size", "vae_cache_scan_behaviour", "vae_cache_ondemand", "vae_enable_tiling", "vae_dtype",
    "keep_vae_loaded", "compress_disk_cache", "aspect_bucket_disable_rebuild", "skip_file_discovery",
    "preserve_data_backend_cache", "override_dataset_config", "cache_dir_text", "cache_dir_vae", "cache_dir",
    "cache_clear_validation_prompts", "write_batch_size", "read_batch_size", "image_processing_batch_size",
    "enable_multiprocessing", "max_workers", "aws_max_pool_connections", "torch_num_threads", "dataloader_prefetch",
    "dataloader_prefetch_qlen", "aspect_bucket_worker_count", "metadata_update_interval", "logging_dir",
    "print_filenames", "print_sampler_statistics", "debug_aspect_buckets", "debug_dataset_loader", "allow_tf32",
    "disable_tf32", "enable_xformers_memory_efficient_attention", "attention_mechanism", "set_grads_to_none",
    "local_rank", "quantize_via", "validation_seed_source", "seed_for_each_device", "webhook_config",
    "webhook_reporting_interval", "ema_device", "ema_cpu_only", "ema_foreach_disable", "ema_update_interval",
    "ema_validation", "accelerator_cache_clear_interval", "fully_unload_text_encoder", "offload_during_startup",
    "validation_torch_compile_mode", "i_know_what_i_am_doing",
}


def read_simple(m: Mapping, name: str, key: str, value: Any) -> None:
    """A flag of the tables above; one in none of them is left to `Mapping.finish` to report."""
    if name in DIRECT:
        if value is None or value == "":
            m.same(key, f"not set: {DIRECT[name]} keeps this pack's default")
        else:
            m.set(key, DIRECT[name], value)
    elif name in NOTED:
        quiet = value is None or value is False or str(value).strip().lower() in ("", "no_change", "false", "0")
        m.same(key, None if quiet else NOTED[name].format(value=value))
    elif name in OFF:
        m.drop(key, OFF[name] + ".") if truthy(value) else m.same(key)


def told(m: Mapping, key: str) -> bool:
    """Whether a key was read already (flags read together: the first of them reads them all)."""
    return key in m.honoured or any(u.key == key for u in m.unsupported)


def _model(m, flags, key, value, place):
    name = key.lstrip("-")
    wanted = {"model_type": ("lora", "this pack trains LoRAs; a full fine-tune is not in it"),
              "model_family": ("flux", "this pack trains FLUX.1 (dev, schnell, Krea)")}[name]
    m.same(key) if str(value).strip().lower() == wanted[0] else m.drop(key, f"{value!r}: {wanted[1]}.")


def _steps(m, flags, key, value, place):
    steps, epochs = flags.get("max_train_steps"), flags.get("num_train_epochs")
    if told(m, key):
        return  # read with the other
    if steps and (number(steps[1]) or 0) > 0:
        m.set(steps[0], "train.steps", steps[1])
        if epochs:
            m.same(epochs[0], "max_train_steps decides the length, as in SimpleTuner" if number(epochs[1]) else None)
        return
    if steps:
        m.same(steps[0])
    if epochs and (number(epochs[1]) or 0) > 0:
        m.drop(epochs[0], "this pack counts optimizer steps: set train.steps (an epoch is photos × repeats ÷ "
                          "train_batch_size ÷ gradient_accumulation_steps).")
    elif epochs:
        m.same(epochs[0])


def _path(ours):
    return lambda m, flags, key, value, place: m.set(key, ours, place.ours(str(value)))


def _checkpointing(m, flags, key, value, place):
    m.set(key, "train.memory.checkpointing", "blocks" if truthy(value) else "off")


def _run_name(m, flags, key, value, place):
    name = str(value or "").strip()
    if name and not any(c in name for c in "/\\") and name not in (".", ".."):
        m.set(key, "save.name", name, note="the run's name: folders and LoRA files NAME_001, NAME_002, …")
    else:
        m.same(key) if not name else m.drop(key, f"{name!r} is no file name; set save.name (no '/').")


def _keep(m, flags, key, value, place):
    m.set(key, "save.keep_last", 0, note="no limit: every checkpoint is kept") if value in (None, "") else \
        m.set(key, "save.keep_last", value)


def _validation_size(m, flags, key, value, place):
    sizes = [s.strip().lower() for s in str(value).split(",") if s.strip()]
    width, _, height = sizes[0].partition("x") if sizes else ("", "", "")
    size, other = number(width), number(height or width)
    if size is None or size != other:
        m.drop(key, f"{value!r}: validation.size is one square size here (e.g. 1024x1024).")
        return
    px = max(16, round(size / 16) * 16)
    told = [f"{size:g} is rounded to {px}"] * (px != size) + [f"only {sizes[0]} is rendered"] * (len(sizes) > 1)
    m.set(key, "validation.size", px, note="; ".join(told) or None)


def _benchmark(m, flags, key, value, place):
    m.set(key, "validation.before_training", not truthy(value),
          note="the base model's samples (SimpleTuner's benchmark) are those before the first step")


def _caption_dropout(m, flags, key, value, place):
    if not number(value):
        m.same(key)
    else:
        m.set(key, "dataset.caption_dropout", value,
              note="SimpleTuner drops the whole caption; here the step keeps the trigger word (and class word)")


def _quantised(m, flags, key, value, place):
    quantization.honour(m, "SimpleTuner", "base_model_precision", key, "no_change" if value in (None, "") else value)


def _resume(m, flags, key, value, place):
    m.same(key) if not value else m.note(key, "continue a run with `python -m trainer train --config FILE "
                                              "--resume latest` (or a checkpoint's path).")


def _trackers(m, flags, key, value, place):
    report = str(flags.get("report_to", ("", "none"))[1] or "none").strip().lower()
    if report == "none":
        m.same(key)
    else:
        m.drop(key, f"no {report} here: each run folder has loss.png, loss_history.csv and summary.json.")


def _hub(m, flags, key, value, place):
    m.drop(key, HUB + ".") if truthy(flags.get("push_to_hub", ("", False))[1]) else \
        m.same(key, None if not value else "used only with --push_to_hub")


def _timesteps(m, flags, key, value, place):
    """--flow_schedule_shift (a fixed shift wins), --flow_schedule_auto_shift, --flow_use_uniform_schedule."""
    def flag(*names):
        return next((flags[n] for n in names if n in flags), None)
    shift = flag("flow_schedule_shift", "flux_schedule_shift")
    auto = flag("flow_schedule_auto_shift", "flux_schedule_auto_shift")
    uniform = flag("flow_use_uniform_schedule", "flux_use_uniform_schedule")
    if any(told(m, f[0]) for f in (shift, auto, uniform) if f):
        return
    mode = "uniform" if uniform and truthy(uniform[1]) else "logit_normal"
    if uniform:
        m.set(uniform[0], "train.timesteps.mode", "uniform") if truthy(uniform[1]) else m.same(uniform[0])
    if shift and (number(shift[1]) or 0) > 0:
        m.set(shift[0], "train.timesteps.mode", mode)
        m.set(shift[0], "train.timesteps.shift", number(shift[1]))
        if auto:
            m.same(auto[0], "a fixed --flow_schedule_shift wins over auto-shift, as in SimpleTuner"
                   if truthy(auto[1]) else None)
    elif auto and truthy(auto[1]) and mode == "logit_normal":
        m.set(auto[0], "train.timesteps.mode", "flux_shift", note="FLUX's shift for the image size, as auto-shift")
        if shift:
            m.same(shift[0])
    elif auto and truthy(auto[1]):
        m.drop(auto[0], "auto-shift of uniform σ is not here (flux_shift shifts the logit-normal draw).")
    else:
        if shift:  # 0 or none: SimpleTuner's logit-normal draw, unshifted
            m.set(shift[0], "train.timesteps.mode", mode, note="no shift: SimpleTuner's sigmoid bell, unshifted")
        if auto:
            m.same(auto[0])


def _guidance_mode(m, flags, key, value, place):
    mode = str(flags.get("flux_guidance_mode", ("", "constant"))[1] or "constant").strip().lower()
    if key.lstrip("-") == "flux_guidance_mode":
        m.same(key) if mode == "constant" else m.drop(key, f"{mode!r}: this pack trains at one guidance value "
                                                           "(train.guidance).")
    elif mode == "constant":
        m.same(key, "used only with --flux_guidance_mode random-range")
    else:
        m.drop(key, "this pack trains at one guidance value (train.guidance).")


def _ema(m, flags, key, value, place):
    on = next((flags[n] for n in ("use_ema", "ema") if n in flags), None)
    decay = flags.get("ema_decay")
    if key.lstrip("-") == "ema_decay" and not (on and truthy(on[1])):
        m.same(key, "used only with --use_ema")
    elif key.lstrip("-") == "ema_decay":
        m.set(key, "train.ema_decay", value, note="the saved LoRA here is the EMA average")
    elif truthy(value) and decay is None:
        m.set(key, "train.ema_decay", 0.995, note="SimpleTuner's --ema_decay 0.995; the saved LoRA is the average")
    else:
        m.same(key)


def _text_encoder(m, flags, key, value, place):
    train = flags.get("train_text_encoder")
    if train and truthy(train[1]):
        if not told(m, train[0]):
            lr = flags.get("text_encoder_lr", flags.get("learning_rate", (None, 1e-4)))[1]
            m.set(train[0], "train.text_encoder_lr", lr)
        if "text_encoder_lr" in flags:
            m.same(flags["text_encoder_lr"][0])
    else:
        m.same(key, "used only with --train_text_encoder" if key.lstrip("-") == "text_encoder_lr" else None)


def _lora_extras(m, flags, key, value, place):
    name = key.lstrip("-")
    if name == "use_dora":
        m.set(key, "layers.variant", "dora") if truthy(value) else m.same(key)
    elif name == "init_lora":
        m.set(key, "layers.network_weight", place.ours(str(value))) if value else m.same(key)
    elif name == "lora_dropout":
        m.same(key) if not number(value) else m.drop(key, "this pack trains LoRAs without dropout.")
    else:  # lora_init_type
        m.same(key) if str(value or "default") == "default" else m.drop(
            key, f"{value!r}: LoRAs start here as peft's default (A random, B zero).")


def _cfg(m, flags, key, value, place):
    real = number(flags.get("validation_guidance_real", ("", 1.0))[1]) or 1.0
    name = key.lstrip("-")
    if name == "validation_guidance_real":
        m.same(key) if real <= 1 else m.drop(key, "samples use FLUX's distilled guidance (validation.guidance), "
                                                  "no CFG.")
    elif name == "validation_negative_prompt":
        m.same(key, "used only with CFG (--validation_guidance_real above 1)" if value else None)
    elif name == "validation_guidance_rescale":
        m.same(key) if not number(value) else m.drop(key, "samples here are not rescaled.")
    else:  # num_validation_images
        m.same(key) if number(value) in (None, 1) else m.drop(key, "one sample per prompt here.")


FLAG_READERS: dict[str, Callable[[Mapping, Flags, str, Any, Place], None]] = {
    "model_type": _model, "model_family": _model, "max_train_steps": _steps, "num_train_epochs": _steps,
    "output_dir": _path("save.output"), "gradient_checkpointing": _checkpointing, "tracker_run_name": _run_name,
    "checkpoints_total_limit": _keep, "validation_resolution": _validation_size, "disable_benchmark": _benchmark,
    "caption_dropout_probability": _caption_dropout, "base_model_precision": _quantised,
    "resume_from_checkpoint": _resume, "report_to": _trackers, "tracker_project_name": _trackers,
    "tracker_image_layout": _trackers, "hub_model_id": _hub, "model_card_note": _hub, "model_card_safe_for_work": _hub,
    **dict.fromkeys(("flow_schedule_shift", "flux_schedule_shift", "flow_schedule_auto_shift",
                     "flux_schedule_auto_shift", "flow_use_uniform_schedule", "flux_use_uniform_schedule"), _timesteps),
    **dict.fromkeys(("flux_guidance_mode", "flux_guidance_min", "flux_guidance_max"), _guidance_mode),
    **dict.fromkeys(("use_ema", "ema", "ema_decay"), _ema),
    **dict.fromkeys(("train_text_encoder", "text_encoder_lr"), _text_encoder),
    **dict.fromkeys(("use_dora", "init_lora", "lora_dropout", "lora_init_type"), _lora_extras),
    **dict.fromkeys(("validation_guidance_real", "validation_negative_prompt", "validation_guidance_rescale",
                     "num_validation_images"), _cfg),
}
