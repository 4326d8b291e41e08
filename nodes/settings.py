"""Training Settings: the optimizer, schedule, timestep and loss knobs beyond the Train node's own,
in one small node whose output plugs into Train's `settings` (unconnected: the defaults below)."""

from __future__ import annotations

from dataclasses import dataclass, field

from comfy_api.latest import io

from ..trainer.loop import optimizers
from ..trainer.loop.losses import LOSS_WEIGHTINGS, LOSSES, LossSettings
from ..trainer.loop.quantize import BASE_QUANTIZATIONS
from . import ids, sockets


@dataclass(frozen=True)
class TrainingSettings:
    """What the node sets: TrainConfig fields, TimestepSampling fields besides its mode, and
    MemoryConfig fields besides the Train node's own."""

    train: dict = field(default_factory=dict)
    timesteps: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


class TrainingSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.TRAINING_SETTINGS,
            display_name="Training Settings",
            category=sockets.Category.TRAINING,
            description="Optimizer, gradient accumulation, schedule shape, noise-level and loss settings, by the "
                        "names ai-toolkit, SimpleTuner, kohya and diffusers use. Plug into the Train node's "
                        "`settings`; without it Train uses AdamW, MSE and the defaults shown here.",
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
                loss_weighting, base_quantization="none") -> io.NodeOutput:
        train = dict(optimizer=optimizer, optimizer_args=optimizers.parse_args(optimizer_args),
                     gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
                     lr_num_cycles=lr_num_cycles, lr_power=lr_power, lr_end=lr_end,
                     loss=LossSettings(loss, huber_c, loss_weighting))
        timesteps = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, shift=shift)
        return io.NodeOutput(TrainingSettings(train, timesteps, dict(base_quantization=base_quantization)))
