"""Training Settings: the optimizer, schedule, timestep, loss and preservation (DOP) knobs beyond
the Train node's own, in one small node whose output plugs into Train's `settings` (unconnected:
the defaults below)."""

from __future__ import annotations

from dataclasses import dataclass, field

from comfy_api.latest import io

from ..trainer.loop import optimizers
from ..trainer.loop.config import TrainConfig
from ..trainer.loop.losses import LOSS_WEIGHTINGS, LOSSES, LossSettings
from ..trainer.loop.quantize import BASE_QUANTIZATIONS
from . import ids, sockets


@dataclass(frozen=True)
class TrainingSettings:
    """What the node sets: TrainConfig fields, TimestepSampling fields besides its mode, and
    MemoryConfig fields besides the Train node's own. From Import Training Config, `config` is a
    whole train section instead, used in place of the Train node's widgets (but for the machine's
    own: memory, lora_dtype, cache)."""

    train: dict = field(default_factory=dict)
    timesteps: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    config: TrainConfig | None = None


class TrainingSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.TRAINING_SETTINGS,
            display_name="Training Settings",
            category=sockets.Category.TRAINING,
            description="Optimizer, gradient accumulation, schedule shape, noise-level and loss settings, and "
                        "differential output preservation and training the text encoder too, by the names "
                        "ai-toolkit, SimpleTuner, kohya and diffusers use. Plug into the Train node's `settings`; "
                        "without it Train uses AdamW, MSE and the defaults shown here.",
            inputs=[
                io.Combo.Input("optimizer", options=list(optimizers.OPTIMIZERS), default="adamw",
                               tooltip="adamw: the usual choice. adamw8bit: ai-toolkit's `optimizer: adamw8bit`, "
                                       "a quarter of the optimizer memory (needs `pip install bitsandbytes`). "
                                       "adafactor: least memory. prodigy: finds its own step size, set "
                                       "learning_rate to 1.0. lion: use a 3–10× lower learning_rate. "
                                       "adamw_schedulefree: no decay needed, keep lr_schedule constant."),
                io.String.Input("optimizer_args", default="",
                                tooltip="Extra optimizer settings as key=value pairs, like kohya's "
                                        "--optimizer_args: 'betas=0.9,0.99 eps=1e-8', or for prodigy "
                                        "'d_coef=1 use_bias_correction=True safeguard_warmup=True'. Empty for "
                                        "the library's defaults."),
                io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=256,
                             tooltip="Add up the gradients of this many batches per optimizer step: the effect "
                                     "of a larger batch without its memory (ai-toolkit's `gradient_accumulation`). "
                                     "1 is usual; steps stay optimizer steps, so each takes this many times longer."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Clip the gradient to this norm before each step (SimpleTuner's "
                                       "--max_grad_norm 1.0). Guards against the odd huge step; 0 turns it off."),
                io.Int.Input("lr_num_cycles", default=1, min=1, max=100,
                             tooltip="Restarts of lr_schedule cosine_with_restarts (diffusers' --lr_num_cycles): "
                                     "the rate falls to 0 and jumps back this many times. 1–4."),
                io.Float.Input("lr_power", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip="Exponent of lr_schedule polynomial (diffusers' --lr_power): 1.0 decays "
                                       "in a straight line, above 1 drops faster early, below 1 holds the rate "
                                       "longer."),
                io.Float.Input("lr_end", default=4e-7, min=0.0, max=1.0, step=1e-7, round=False,
                               tooltip="The learning rate polynomial decays to at the last step (SimpleTuner's "
                                       "--lr_end, 4e-7). Must be below learning_rate."),
                io.Float.Input("shift", default=1.0, min=0.05, max=20.0, step=0.05,
                               tooltip="A fixed shift of the noise levels, σ' = shift·σ / (1 + (shift − 1)·σ) "
                                       "(SD3's 3.0, SimpleTuner's flow_schedule_shift): above 1 trains at noisier "
                                       "levels (composition), below 1 at cleaner (detail). 1 = off; not with "
                                       "timestep_sampling flux_shift, which shifts by image size."),
                io.Float.Input("logit_mean", default=0.0, min=-5.0, max=5.0, step=0.05,
                               tooltip="Centre of the logit-normal noise levels (diffusers' --logit_mean, for "
                                       "timestep_sampling logit_normal and flux_shift): 0 centres on mid noise, "
                                       "positive values train noisier."),
                io.Float.Input("logit_std", default=1.0, min=0.01, max=5.0, step=0.05,
                               tooltip="Spread of the logit-normal noise levels (diffusers' --logit_std): 1.0 is "
                                       "usual; lower concentrates on logit_mean."),
                io.Float.Input("mode_scale", default=1.29, min=-1.0, max=1.75, step=0.01,
                               tooltip="For timestep_sampling mode (diffusers' --mode_scale, SD3 paper): how much "
                                       "mass goes to mid noise. 1.29 is diffusers' value; 0 is uniform."),
                io.Combo.Input("loss", options=list(LOSSES), default="mse",
                               tooltip="mse: the flow-matching loss every tool uses. l1: less pull from outliers, "
                                       "slower. huber / pseudo_huber (kohya's and SimpleTuner's --loss_type "
                                       "huber): like mse for small errors and like l1 for big ones, so a few odd "
                                       "pixels (watermarks, bad crops) matter less."),
                io.Float.Input("huber_c", default=0.1, min=0.001, max=10.0, step=0.01,
                               tooltip="Where huber and pseudo_huber turn from squared to linear (kohya's and "
                                       "SimpleTuner's --huber_c 0.1). Larger behaves more like mse."),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="none",
                               tooltip="Weight the loss by noise level, as diffusers' --weighting_scheme: "
                                       "none (usual), cosmap (SD3's, favours mid noise), sigma_sqrt (1/σ², "
                                       "strongly favours low noise, fine detail). Not with timestep_sampling "
                                       "weighted, which weights already."),
                io.Float.Input("dop_multiplier", default=0.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Differential output preservation (ai-toolkit's diff_output_preservation): "
                                       "each step also asks about the caption with the trigger replaced by the "
                                       "class word ('a photo of sks person' -> 'a photo of person') and holds the "
                                       "LoRA's answer to the model's own, so other people don't start to look "
                                       "like your subject. The weight of that term: 0 = off, 0.5–1.0 usual (1.0 "
                                       "is ai-toolkit's diff_output_preservation_multiplier). Costs about 2 more "
                                       "forward passes per step."),
                io.String.Input("dop_class", default="", optional=True,
                                tooltip="The class word DOP puts in place of the trigger word ('person', 'dog'; "
                                        "ai-toolkit's diff_output_preservation_class). Empty: the dataset's "
                                        "class word."),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1e-2, step=1e-6, round=False,
                               optional=True,
                               tooltip="Also train a LoRA on the text encoder (CLIP-L), at this rate: helps the "
                                       "likeness of faces and names. 0 keeps it frozen (the usual). 5e-6 (ai-toolkit "
                                       "recipes' late text-encoder finetune) to 3e-5 (their global rate once it is "
                                       "on). Costs memory and time: from text_encoder_start on, every step encodes "
                                       "its captions through it (diffusers' --text_encoder_lr)."),
                io.Float.Input("text_encoder_start", default=0.0, min=0.0, max=100000.0, step=0.01, optional=True,
                               tooltip="When the text encoder starts training: below 1 a fraction of the steps "
                                       "(0.8–0.85: the last 15–20%, as ai-toolkit recipes do to keep the words' "
                                       "meaning from drifting early), from 1 up a step number (5600). 0: from the "
                                       "first step (diffusers' --train_text_encoder)."),
                io.Int.Input("text_encoder_rank", default=0, min=0, max=256, optional=True,
                             tooltip="Rank of the text encoder's LoRA (alpha = rank). 0: the transformer LoRA's "
                                     "rank and alpha. 4–16 is plenty for CLIP-L."),
                io.Boolean.Input("text_encoder_t5", default=False, optional=True,
                                 tooltip="Also train T5-XXL, the encoder FLUX reads the prompt's words from. Off: "
                                         "CLIP-L only, as diffusers does. T5 has 4.7B parameters: far more memory "
                                         "and time per step; only the kohya format saves it."),
                io.Combo.Input("base_quantization", options=list(BASE_QUANTIZATIONS), default="none", optional=True,
                               tooltip="int8: hold the base model's block weights in int8 while training, about "
                                       "half of bf16's memory, the LoRA still in full precision (mflux's "
                                       "`quantize: 8`, SimpleTuner's `base_model_precision: int8-quanto`). Needs "
                                       "`pip install torchao`; for bf16/fp16 models, not with swap_blocks; the "
                                       "MODEL gets its own weights back after training. For 4-bit, or with "
                                       "swap_blocks, load a GGUF file (Q4_K, Q8_0) with ComfyUI-GGUF's Unet Loader "
                                       "(GGUF) instead and keep none."),
            ],
            outputs=[sockets.TrainingSettings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, optimizer, optimizer_args, gradient_accumulation_steps, max_grad_norm, lr_num_cycles,
                lr_power, lr_end, shift, logit_mean, logit_std, mode_scale, loss, huber_c,
                loss_weighting, dop_multiplier=0.0, dop_class="", text_encoder_lr=0.0, text_encoder_start=0.0,
                text_encoder_rank=0, text_encoder_t5=False, base_quantization="none") -> io.NodeOutput:
        train = dict(optimizer=optimizer, optimizer_args=optimizers.parse_args(optimizer_args),
                     gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
                     lr_num_cycles=lr_num_cycles, lr_power=lr_power, lr_end=lr_end,
                     loss=LossSettings(loss, huber_c, loss_weighting), dop_multiplier=dop_multiplier,
                     dop_class=dop_class, text_encoder_lr=text_encoder_lr, text_encoder_start=text_encoder_start,
                     text_encoder_rank=text_encoder_rank, text_encoder_t5=text_encoder_t5)
        timesteps = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, shift=shift)
        return io.NodeOutput(TrainingSettings(train, timesteps, dict(base_quantization=base_quantization)))
