"""The Train node: encode the dataset with the workflow's CLIP and VAE, train on the workflow's
own FLUX as a job (see session.py), hand back the model (and, when the text encoder trains too, the
CLIP) with the LoRA applied."""

from __future__ import annotations

import dataclasses
import time

import torch
from comfy_api.latest import io

from ..trainer.data import controls
from ..trainer.data.encode import EncodeCache, encode_dataset
from ..trainer.log import logger
from ..trainer.loop.config import LR_SCHEDULES, TrainConfig
from ..trainer.loop.flow import TIMESTEP_SAMPLINGS, TimestepSampling
from ..trainer.loop.job import JobSpec
from ..trainer.loop.memory import MemoryConfig
from ..trainer.loop.text_phase import text_targets
from ..trainer.lora.targets import LayerSpec
from ..trainer.lora.weights import LORA_DTYPES
from ..trainer.outputs import export, progress
from ..trainer.outputs.checkpoints import RunSettings
from ..trainer.recipe import from_run
from ..trainer.recipe.schema import SaveSection
from . import ids, lora_io, session, sockets
from .host import loras, models, paths
from .settings import TrainingSettings

log = logger(__name__)

DEFAULT_LAYERS = "attention+mlp"
CHECKPOINTING = {"every block": ("blocks", 1), "every 2nd block": ("blocks", 2), "every 4th block": ("blocks", 4),
                 "every block, offload to CPU": ("offload", 1), "off": ("off", 1)}


# how `python -m trainer train` names the embedded tiny model of each family (Chroma has none there)
TINY_ON_THE_COMMAND_LINE = {"flux1": "--model tiny", "flux2": "--model tiny --family flux2"}


def write_recipe(folder, config, spec, layout, dataset, run, validation, save, base: str, lora_dtype: str,
                 family: str) -> None:
    """The run's recipe into its folder (recipe.yaml, recipe_ai_toolkit.yaml), with the node's own
    settings a file can't hold named there."""
    command = "--models-dir ~/ComfyUI/models --model FILE"
    if family in TINY_ON_THE_COMMAND_LINE:
        command += f" (or {TINY_ON_THE_COMMAND_LINE[family]}, the embedded tiny one)"
    notes = [f"model: {base}, the Train node's MODEL input (a model ComfyUI loaded). On the command line name "
             f"its file: {command}."]
    if save is None:
        notes.append("save.dtype and save.format: no Save FLUX LoRA node saves this LoRA in the workflow (written: "
                     "fp16, kohya).")
    if lora_dtype != "fp32":
        notes.append(f"lora_dtype {lora_dtype}: the Train node's LoRA precision (the recipe trains in fp32).")
    save = dataclasses.replace(save or SaveSection(), output=str(paths.runs_root()))  # where this run went
    try:
        ran = from_run.recipe_of_run(config, spec, layout, dataset, run, validation and validation.recipe_section(),
                                     save, notes)
    except ValueError as e:  # a setting our format refuses: the run trains, without its recipe file
        log.warning("The run's recipe is not written (recipe.yaml): %s", e)
        return
    from_run.write_run_recipe(folder, ran)


class TrainFluxLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.TRAIN,
            display_name="Train FLUX LoRA (DreamBooth)",
            category=sockets.Category.TRAINING,
            description="Teaches the loaded FLUX your subject: a flow-matching LoRA trained on the MODEL as "
                        "ComfyUI loaded it (bf16, fp16 or fp8), on a background thread. Cancel stops it "
                        "within a step.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model to train on: FLUX.1 (dev, schnell, Krea…) or FLUX.2 "
                               "([klein] 4B / 9B, [dev]; needs ComfyUI ≥ 0.3.72). For [klein], load the base "
                               "weights: base and distilled files can't be told apart, and LoRAs trained on "
                               "distilled klein give grey, washed-out images."),
                io.Clip.Input("clip", tooltip="Its text encoders, to encode the captions once (and to train, with "
                                             "Training Settings' text_encoder_lr)."),
                io.Vae.Input("vae", tooltip="Its VAE, to encode the images once."),
                sockets.Dataset.Input("dataset", tooltip="From a DreamBooth Dataset node."),
                sockets.LoraLayers.Input("lora_layers", optional=True,
                                 tooltip="From LoRA Layer Group nodes. Unconnected: attention and MLP layers of "
                                         "every block at rank 16."),
                io.Int.Input("steps", default=1000, min=1, max=100000,
                             tooltip="Optimizer steps. 10–20 photos: 1000–2000 for a subject, more for a style. "
                                     "Too many and samples copy the training photos."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=False,
                               tooltip="1e-4 is the usual FLUX LoRA rate; 5e-5 for faces (people template) or "
                                       "long runs; 2e-4 for quick style runs."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per step. 1 is best for small datasets; raise it only with memory "
                                     "to spare and lower the step count to match."),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seeds LoRA init, image order, noise and σ: same seed, same LoRA (bit for "
                                     "bit on CPU; on a GPU up to its non-deterministic kernels)."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Guidance value shown to guidance-distilled models (dev) while training. "
                                       "1.0 is what ai-toolkit, SimpleTuner and kohya use; ignored by schnell."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default="flux_shift",
                               tooltip="How noise levels are drawn. flux_shift: logit-normal, shifted for image "
                                       "size like FLUX samples (good default). logit_normal: centred on mid "
                                       "noise. uniform: all levels alike. sigmoid: ai-toolkit's `timestep_type: "
                                       "sigmoid`. weighted: ai-toolkit's `weighted` (uniform, mid noise counts "
                                       "most). mode, cosmap: diffusers' SD3 --weighting_scheme densities. Shift, "
                                       "logit and mode settings are on Training Settings."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant",
                               tooltip="constant is the usual choice (it warms up when warmup_steps > 0). linear, "
                                       "cosine: decay to 0 at the end. cosine_with_restarts, polynomial "
                                       "(SimpleTuner's default): shaped on Training Settings. diffusers' "
                                       "get_scheduler, as SimpleTuner and kohya use."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Steps to ramp the learning rate up from 0 (SimpleTuner uses 100; 0–10% of "
                                     "steps). The first warmup step trains at rate 0, as in diffusers."),
                io.Float.Input("weight_decay", default=1e-4, min=0.0, max=1.0, step=1e-4, round=False,
                               tooltip="AdamW weight decay on the LoRA: 1e-4 (diffusers' default) to 0.01 (ai-toolkit "
                                       "recipes)."),
                io.Combo.Input("checkpointing", options=list(CHECKPOINTING), default="every block",
                               tooltip="Recompute blocks in backward instead of storing their activations: far "
                                       "less memory for about a third more time. 'every 2nd/4th block' is faster "
                                       "and needs more; 'offload to CPU' needs least; 'off' keeps every block's "
                                       "activations: only with plenty of memory to spare."),
                io.Int.Input("swap_blocks", default=0, min=0, max=57,
                             tooltip="Keep the last N blocks' weights in CPU memory, never loaded onto the GPU, and "
                                     "stream each in while the one before it computes (two are on the GPU at a "
                                     "time): N frees N-2 blocks' weights (FLUX.1: 141M parameters each, 141 MB in "
                                     "fp8), a little slower. For a model larger than the card. 0 keeps the model "
                                     "on the GPU."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile each block: faster steps on recent GPUs after a minute or "
                                         "two of compiling. Needs a working Triton (Linux) and is off by default."),
                io.Combo.Input("lora_dtype", options=list(LORA_DTYPES), default="fp32",
                               tooltip="Precision of the trained LoRA weights. Keep fp32: in bf16 the small "
                                       "updates of low learning rates (5e-5) are often rounded away."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001, round=False,
                               tooltip="Keep an exponential moving average of the LoRA and save that: smoother "
                                       "results (ai-toolkit's ema_decay, usually 0.999). 0 turns it off."),
                sockets.Validation.Input("validation", optional=True,
                                 tooltip="From Validation Samples: render an evaluation set while training."),
                io.Combo.Input("cache", options=["memory", "disk"], default="memory",
                               tooltip="Where encoded images and captions are kept for the next run with the same "
                                       "photos, captions and encoders: memory (until ComfyUI restarts) or disk "
                                       "(output/flux_dreambooth/cache, across restarts)."),
                sockets.RunSettings.Input("run", optional=True,
                                  tooltip="From Checkpoints & Resume. Unconnected: run 'flux_lora', a checkpoint "
                                          "every 250 steps, the last 4 kept."),
                sockets.TrainingSettings.Input("settings", optional=True,
                                               tooltip="From Training Settings: optimizer (adamw8bit, prodigy, "
                                                       "lion…), gradient accumulation, schedule shape, shift, "
                                                       "loss. Unconnected: AdamW, MSE, max_grad_norm 1.0. From "
                                                       "Import Training Config: the config's whole train section, "
                                                       "used instead of the widgets above (checkpointing, "
                                                       "swap_blocks, compile, lora_dtype and cache stay yours)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the trained LoRA applied."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA, for Save FLUX LoRA or Apply FLUX LoRA."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step (works with Plot Loss Graph)."),
                io.Image.Output(display_name="samples",
                                tooltip="The last validation render (the loss plot when there is none); every "
                                        "render is in the run folder's samples/."),
                io.Image.Output(display_name="loss_plot", tooltip="Raw and smoothed loss against step."),
                io.String.Output(display_name="run_folder", tooltip="The run's folder under output/flux_dreambooth: "
                                                                    "checkpoints, samples, plots."),
                io.Clip.Output(display_name="clip",
                               tooltip="The CLIP with the trained text-encoder LoRA applied (Training Settings' "
                                       "text_encoder_lr); the CLIP as it came when the text encoder was not trained."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, batch_size, seed, guidance,
                timestep_sampling, lr_schedule, warmup_steps, weight_decay, checkpointing, swap_blocks, compile,
                lora_dtype, ema_decay, cache, lora_layers=None, validation=None, run=None,
                settings=None) -> io.NodeOutput:
        knobs = settings or TrainingSettings()
        memory_knobs = dict(knobs.memory)
        if knobs.config is not None:  # an imported recipe's base quantization (mflux's quantize: 8) stays its own
            memory_knobs.setdefault("base_quantization", knobs.config.memory.base_quantization)
        memory_config = MemoryConfig(*CHECKPOINTING[checkpointing], swap_blocks, compile, **memory_knobs)
        if knobs.config is not None:  # an imported recipe's whole train section; the machine's memory mode
            config = dataclasses.replace(knobs.config, memory=memory_config)
            log.info("Train settings from the imported config (steps %d, learning_rate %g, optimizer %s); the "
                     "Train node's own steps, learning_rate, … widgets are not used.", config.steps,
                     config.learning_rate, config.optimizer)
        else:
            config = TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                 weight_decay=weight_decay, guidance=guidance,
                                 timesteps=TimestepSampling(timestep_sampling, **knobs.timesteps),
                                 lr_schedule=lr_schedule, warmup_steps=warmup_steps, ema_decay=ema_decay,
                                 memory=memory_config, **knobs.train)
        backend, patcher = models.flux_backend(model)
        models.check_base_quantization(model, config.memory.base_quantization)
        memory = f"{models.weight_dtype_name(model)} weights, {config.memory.describe()}"
        spec = lora_layers.resolved(backend.dims) if lora_layers else LayerSpec.preset(DEFAULT_LAYERS, backend.dims,
                                                                                         rank=16)
        keep_off = backend.swapped_blocks(config.memory)
        trainable = models.trainable_text(clip, patcher, keep_off) if config.text_encoder_lr > 0 else None
        text_part = text_targets(config, trainable, spec)
        text_encoders = tuple(dict.fromkeys(t.component for t in text_part))
        targets = spec.targets(backend.dims) + text_part
        settings = run or RunSettings()
        folder, resume = settings.folder_and_checkpoint(paths.runs_root())
        started = time.perf_counter()
        if validation:
            validation.check(dataset.triggers)  # a prompt naming [trigger2] of a one-subject dataset: now, by name
        store = EncodeCache(paths.runs_root() / "cache" if cache == "disk" else None)
        examples, skipped = encode_dataset(dataset, models.ComfyEncoders(model, clip, vae), store, config.seed,
                                           dop_class=config.preservation_class())
        renderer = validation and validation.renderer(clip, vae, dataset.triggers, folder.path / "samples", dataset)
        scored = validation and validation.scoring(dataset)
        if validation and not scored:
            log.info("No likeness/drift scores: connect Load CLIP Vision to Validation Samples' clip_vision for them.")
        base, base_loras = models.loaded_from(cls.hidden.prompt, cls.hidden.unique_id)  # the file it was loaded from
        unknown = f"unknown {backend.family.label} [{backend.variant}]"
        base = base or getattr(model.model, "flux_dreambooth_name", unknown)
        resolution = ",".join(str(r) for r in sorted({i.shaping.resolution for i in dataset.items}))
        metadata = export.LoraMetadata(spec, dataset.triggers, base, {
            "resolution": resolution, "learning_rate": config.learning_rate, "seed": config.seed,
            "run": folder.path.name,
            "optimizer": config.optimizer, "lr_schedule": config.lr_schedule,
            **({"base_model_loras": ", ".join(base_loras)} if base_loras else {}),
            **({"text_encoder_lr": config.text_encoder_lr, "text_encoder_start": config.text_encoder_start_step()}
               if text_part else {})},
            family=backend.family.name, variant=controls.variant(backend.variant, dataset),
            text_encoders=text_encoders)
        write_recipe(folder.path, config, spec, backend.dims, dataset, settings, validation,
                     lora_io.save_section(cls.hidden.prompt, cls.hidden.unique_id), base, lora_dtype,
                     backend.family.name)
        log.info("Training %d LoRA layers on %d images at %s for %d steps into %s (%s)%s.", len(targets),
                 len(examples), resolution, config.steps, folder.path, memory,
                 f", resuming {resume.name}" if resume else "")
        job = JobSpec(backend, examples, config, targets, folder, settings, metadata, LORA_DTYPES[lora_dtype],
                      resume, validation and validation.schedule(), text_encoder=trainable, scoring=scored or None)
        with models.quantized_base(patcher, backend, config.memory.base_quantization):
            # after encoding, so loading the encoders can't push it out; swapped blocks stay in CPU memory
            models.load_for_training(patcher, keep_off)
            outcome = session.train(job, str(cls.hidden.unique_id), patcher, renderer)

        trained = export.TrainedLora(outcome.lora, metadata.header(outcome.steps_done), outcome.kohya)
        seconds = time.perf_counter() - started
        before, after = outcome.loss_before, outcome.loss_after
        text_summary = (f" ({len(text_part)} on {', '.join(text_encoders)} from step {config.text_encoder_start_step()}"
                        f" at {config.text_encoder_lr:g})" if text_part else "")
        summary = (f"{outcome.steps_done} steps{' (stopped)' if outcome.stopped else ''} in {seconds:.0f} s on "
                   f"{len(targets)} LoRA layers{text_summary}; fixed-noise loss {before:.4f} → {after:.4f} "
                   f"({100 * (after / before - 1):+.1f}%); run {folder.path.name}; {len(examples)} images, "
                   f"{store.hits} encodings from the cache, {store.misses} computed; {memory}"
                   + (f"\nLeft out: {'; '.join(skipped)}" if skipped else "")
                   + "".join(f"\n{note}" for note in outcome.notes))
        log.info("Trained: %s", summary)
        plot = progress.to_pixels(progress.loss_plot(outcome.history, outcome.scores))[None]
        samples = torch.cat(outcome.images) if outcome.images else plot
        ui = {"text": [summary], "fixed_noise_loss": [before, after]}  # samples show in the node's panel
        clip_out = loras.apply_lora_to_clip(clip, trained, 1.0) if text_part else clip
        return io.NodeOutput(loras.apply_lora(model, trained, 1.0), trained, {"loss": outcome.losses}, samples,
                             plot, str(folder.path.relative_to(paths.runs_root())), clip_out, ui=ui)

