"""An ai-toolkit process's `train` section read as our recipe (see `reader`)."""

from __future__ import annotations

from typing import Any

from .job import Job, join, num

TIMESTEPS = {"sigmoid": "sigmoid", "linear": "uniform", "weighted": "weighted", "flux_shift": "flux_shift",
             "shift": "flux_shift"}  # shift: FLUX's scheduler shifts by image size (use_dynamic_shifting)
OPTIMIZERS = {"adam": "adamw", "adam8bit": "adamw8bit", "prodigy8bit": "prodigy"}  # Adam: AdamW with no decay
EPS_1E6 = ("adamw", "adamw8bit", "adam", "adam8bit", "prodigy", "prodigy8bit")  # ai-toolkit passes them eps=1e-6
WEIGHT_DECAY = {"adamw": 0.01, "adamw8bit": 0.01}  # torch's and bitsandbytes' default; the others' is 0
LOSSES = {"mse": "mse", "mae": "l1", "pseudo_huber": "pseudo_huber"}
SHIFTED = ("ai-toolkit shifts evenly spread σ by the image size; this pack shifts logit-normal σ (more of them at "
           "mid noise). timestep_type linear is ai-toolkit's even spread (train.timesteps.mode uniform)")
UNLESS_DEFAULT = {  # train keys honoured at these values, with why any other is not
    "train_unet": ((True,), "this pack trains the transformer's LoRA (train_unet: true)"),
    "noise_scheduler": (("flowmatch",), "FLUX trains with flow matching here (noise_scheduler: flowmatch)"),
    "content_or_style": (("balanced",), "ai-toolkit's cubic bias of timesteps toward noisy (content) or clean "
                                        "(style) steps is not here: σ follows train.timesteps.mode"),
    "linear_timesteps": ((False,), "that loss weighting by timestep is not here (timestep_type: weighted is)"),
    "linear_timesteps2": ((False,), "that loss weighting by timestep is not here (timestep_type: weighted is)"),
    "min_denoising_steps": ((0,), "σ is drawn over the whole range here"),
    "max_denoising_steps": ((999, 1000), "σ is drawn over the whole range here"),
    "noise_offset": ((0,), "noise offset is not used here"),
    "min_snr_gamma": ((None, 0), "SNR weighting is for noise-predicting models, not here"),
    "snr_gamma": ((None, 0), "SNR weighting is for noise-predicting models, not here"),
    "blank_prompt_preservation": ((False,), "blank prompt preservation is not done here"),
    "bypass_guidance_embedding": ((False,), "the guidance embedding is always used here"),
    "do_cfg": ((False,), "training with CFG is not done here"),
    "merge_network_on_save": ((False,), "this pack saves the LoRA, never a merged model"),
    "weight_jitter": ((0,), "weight jitter is not done here"),
    "max_loss": ((None,), "the loss is not clipped here"),
    "inverted_mask_prior": ((False,), "masks are not used here"),
}
ALSO = {"xformers": "attention is ComfyUI's own here.", "sdp": "attention is ComfyUI's own here.",
        "attention_backend": "attention is ComfyUI's own here.", "force_first_sample": None,
        "cache_text_embeddings": "captions are encoded once, before training, here.",
        "unload_text_encoder": "captions are encoded once, before training, here.", "disable_sampling": None,
        "dtype": "the transformer trains in the precision ComfyUI loads it in (bf16 is the reference)."}


def read_train(job: Job, t: dict, base: str) -> None:
    m = job.m

    def key(name: str) -> str:
        return join(base, name)

    for name, ours in (("batch_size", "train.batch_size"), ("steps", "train.steps"),
                       ("max_grad_norm", "train.max_grad_norm"), ("cfg_scale", "train.guidance"),
                       ("gradient_accumulation", "train.gradient_accumulation_steps"),
                       ("reg_weight", "dataset.regularisation_weight")):
        if name in t:
            job.set(key(name), ours, t[name])
    _legacy_accumulation(job, t, key("gradient_accumulation_steps"))
    for name, (fine, why) in UNLESS_DEFAULT.items():
        if name in t:
            job.only(key(name), num(t[name]) if isinstance(t[name], (int, float)) else t[name], fine, why)
    for name, note in ALSO.items():
        if name in t:
            m.same(key(name), note)
    if "gradient_checkpointing" in t:
        job.set(key("gradient_checkpointing"), "train.memory.checkpointing",
                "blocks" if t["gradient_checkpointing"] else "off")
    if "skip_first_sample" in t:
        job.set(key("skip_first_sample"), "validation.before_training", not t["skip_first_sample"])
    _optimizer(job, t, base)
    _schedule(job, t, base)
    _text_encoder(job, t, base)
    _timesteps_and_loss(job, t, base)
    _ema(job, t.get("ema_config"), key("ema_config"))
    dop = bool(t.get("diff_output_preservation", False))
    multiplier = t.get("diff_output_preservation_multiplier", 1.0)
    if "diff_output_preservation" in t:
        job.planned(key("diff_output_preservation"), "train.dop_multiplier", multiplier if dop else 0.0, 0.0)
    for name, ours in (("diff_output_preservation_multiplier", "train.dop_multiplier"),
                       ("diff_output_preservation_class", "train.dop_class")):
        if name in t and dop:
            job.set(key(name), ours, t[name])
        elif name in t:
            m.same(key(name), "used only with diff_output_preservation, which is off.")


def _legacy_accumulation(job: Job, t: dict, key: str) -> None:
    """ai-toolkit's older gradient_accumulation_steps counts each batch as a step."""
    if "gradient_accumulation_steps" not in t:
        return
    n = num(t["gradient_accumulation_steps"])
    if n == 1:
        job.m.same(key)
    elif not isinstance(n, float) or not n.is_integer() or n < 1:
        job.m.drop(key, f"{t['gradient_accumulation_steps']!r} (-1: a whole epoch) is not done here; set "
                        "gradient_accumulation to a number of batches")
    else:
        steps = int(num(t.get("steps", 1000)))
        job.set(key, "train.gradient_accumulation_steps", int(n),
                f"ai-toolkit counts each batch as a step here: {steps} steps are {max(1, steps // int(n))} optimizer "
                f"steps of {int(n)} batches, so train.steps is {max(1, steps // int(n))}.")
        job.m.settings["train.steps"] = max(1, steps // int(n))


def _optimizer(job: Job, t: dict, base: str) -> None:
    m = job.m
    given = str(t.get("optimizer", "adamw")).strip().lower()
    ours = OPTIMIZERS.get(given, given)
    if "optimizer" in t:
        job.set(join(base, "optimizer"), "train.optimizer", ours,
                f"ai-toolkit's {given} runs here as {ours}" + (" with weight_decay 0 (Adam is AdamW without decay)."
                                                              if given.startswith("adam") else ".")
                if given in OPTIMIZERS else None)
    lr_name = "unet_lr" if "unet_lr" in t else "lr"
    lr = num(t.get(lr_name, 1e-6))
    adaptive = given.startswith(("prodigy", "dadaptation")) and isinstance(lr, float) and lr < 0.1
    note = f"ai-toolkit runs {given} at lr 1.0 when lr is below 0.1, and so does this recipe." if adaptive else None
    if lr_name in t:
        job.set(join(base, lr_name), "train.learning_rate", 1.0 if adaptive else lr, note)
    else:
        job.default("train.learning_rate", 1.0 if adaptive else lr, "lr")
    if "unet_lr" in t and "lr" in t:
        m.same(join(base, "lr"), "unet_lr is given too, and it is the transformer's rate.")
    pkey = join(base, "optimizer_params")
    params = t.get("optimizer_params") if isinstance(t.get("optimizer_params"), dict) else {}
    if "optimizer_params" in t and not params:
        m.same(pkey)
    args = {"eps": 1e-6} if given in EPS_1E6 else {}
    args.update({n: num(v) if isinstance(v, str) else v for n, v in params.items() if n != "weight_decay"})
    if "weight_decay" in params:
        job.set(f"{pkey}.weight_decay", "train.weight_decay", params["weight_decay"])
    else:
        job.default("train.weight_decay", WEIGHT_DECAY.get(given, 0.0), f"{given}'s own weight decay")
    for name in params:
        if name != "weight_decay":
            job.set(f"{pkey}.{name}", "train.optimizer_args", args)
    if args:
        job.default("train.optimizer_args", args, f"ai-toolkit gives {given} eps 1e-6")


def _schedule(job: Job, t: dict, base: str) -> None:
    m = job.m
    name = str(t.get("lr_scheduler", "constant")).strip().lower()
    skey, pkey = join(base, "lr_scheduler"), join(base, "lr_scheduler_params")
    params = t.get("lr_scheduler_params") if isinstance(t.get("lr_scheduler_params"), dict) else {}
    if "lr_scheduler_params" in t and not params:
        m.same(pkey)
    used: dict[str, tuple[str, Any]] = {}  # a param this schedule takes: our key, value
    if name == "constant_with_warmup":
        warmup = params.get("num_warmup_steps", 1000)
        used["num_warmup_steps"] = ("train.warmup_steps", warmup)
        if "num_warmup_steps" not in params:
            job.default("train.warmup_steps", warmup, "num_warmup_steps")
    elif name == "linear":
        start, end = num(params.get("start_factor", 1 / 3)), num(params.get("end_factor", 1.0))
        if (start, end) != (1.0, 0.0):
            m.drop(skey, f"ai-toolkit's linear is torch's LinearLR from start_factor to end_factor times lr "
                         f"({start:.3g} → {end:.3g} here): this pack's linear decays from lr to 0 (start_factor 1.0, "
                         "end_factor 0.0)")
            name = ""
        used.update({k: ("train.lr_schedule", "linear") for k in ("start_factor", "end_factor") if k in params})
    elif name not in ("constant", "cosine", "cosine_with_restarts"):
        m.drop(skey, f"lr_scheduler {name!r} does not run here as in ai-toolkit; constant, constant_with_warmup, "
                     "cosine, cosine_with_restarts and linear (start_factor 1.0, end_factor 0.0) do")
        name = ""
    if name and "lr_scheduler" in t:
        job.set(skey, "train.lr_schedule", name, "one cycle: ai-toolkit sets T_0 to train.steps."
                if name == "cosine_with_restarts" else None)
    for param in params:
        if not name:
            m.drop(f"{pkey}.{param}", "it belongs to lr_scheduler, which can't be used here")
        elif param in used:
            job.set(f"{pkey}.{param}", *used[param])
        elif param in ("total_iters", "T_max", "T_0"):
            m.same(f"{pkey}.{param}", "ai-toolkit replaces it by train.steps.")
        else:
            m.drop(f"{pkey}.{param}", "not kept: this pack's schedules run over train.steps from lr")


def _text_encoder(job: Job, t: dict, base: str) -> None:
    trained = bool(t.get("train_text_encoder", False))
    rate = t.get("text_encoder_lr", t.get("lr", 1e-6))
    if "train_text_encoder" in t:
        job.planned(join(base, "train_text_encoder"), "train.text_encoder_lr", rate if trained else 0.0, 0.0)
    if "text_encoder_lr" in t:
        if trained:
            job.set(join(base, "text_encoder_lr"), "train.text_encoder_lr", rate)
        else:
            job.m.same(join(base, "text_encoder_lr"), "used only with train_text_encoder, which is off.")


def _timesteps_and_loss(job: Job, t: dict, base: str) -> None:
    given = str(t.get("timestep_type", "sigmoid")).strip().lower()
    mode = TIMESTEPS.get(given)
    if "timestep_type" not in t:
        job.default("train.timesteps.mode", "sigmoid", "timestep_type")
    elif mode is None:
        job.m.drop(join(base, "timestep_type"), f"timestep_type {given!r} is not here; sigmoid, linear (uniform), "
                                                "weighted, flux_shift and shift are")
    else:
        job.set(join(base, "timestep_type"), "train.timesteps.mode", mode,
                SHIFTED + "." if mode == "flux_shift" else None)
    loss = str(t.get("loss_type", "mse")).strip().lower()
    if "loss_type" in t and loss not in LOSSES:
        job.m.drop(join(base, "loss_type"), f"loss_type {loss!r} is not here; mse, mae and pseudo_huber are")
    elif "loss_type" in t:
        job.set(join(base, "loss_type"), "train.loss.kind", LOSSES[loss], (
            "ai-toolkit's is √(r² + c²) − c with c 0.01; this pack's is 2c times that (train.loss.huber_c 0.01): "
            "the same steps for Adam-type optimizers.") if loss == "pseudo_huber" else None)
        if loss == "pseudo_huber":
            job.set(join(base, "loss_type"), "train.loss.huber_c", 0.01)


def _ema(job: Job, ema: Any, key: str) -> None:
    if ema is None:
        return
    ema = ema if isinstance(ema, dict) else {}
    on = bool(ema.get("use_ema", False))
    decay = ema.get("ema_decay", 0.999)
    job.set(join(key, "use_ema") if "use_ema" in ema else key, "train.ema_decay", decay if on else 0.0)
    if "ema_decay" in ema:
        if on:
            job.set(join(key, "ema_decay"), "train.ema_decay", decay)
        else:
            job.m.same(join(key, "ema_decay"), "used only with use_ema, which is off.")
    for name, fine in (("use_feedback", (False,)), ("param_multiplier", (1, 1.0))):
        if name in ema:
            job.only(join(key, name), ema[name], fine, f"EMA's {name} is not done here")
