"""ComfyUI's loaded FLUX.2 as a training backend.

The same `comfy.ldm.flux.model.Flux` class as FLUX.1, built with FLUX.2's parameters; `model_base.
Flux2` prepares its inputs. The text context goes through ComfyUI's own `extra_conds`, which
zero-pads it to the 512 tokens FLUX.2 was trained with, as sampling does; there is no pooled vector,
and guidance reaches the model only where it has a guidance embedding ([dev]). The shared
modulation is computed once per call at model level and handed to every block as tuples of
ComfyUI's ModulationOut (the block runner passes them through checkpoints). As for FLUX.1, nothing
here imports ComfyUI.
"""

from __future__ import annotations

from ..flux1.comfy import ComfyFlux, sdpa_attention
from . import FAMILY


class ComfyFlux2(ComfyFlux):
    family = FAMILY
    takes_references = False  # FLUX.2's reference images are not trained yet

    @staticmethod
    def check_params(params) -> None:
        if not (getattr(params, "global_modulation", False) and getattr(params, "mlp_silu_act", False)):
            raise ValueError("This model has FLUX.1-style blocks (per-block modulation); train it as FLUX.1.")
        if getattr(params, "yak_mlp", False) or getattr(params, "txt_norm", False):
            raise ValueError("This model is a FLUX.2-like variant (gated MLP or text norm: Ovis and the like), "
                             "which this pack does not train.")

    def check_conditioning(self, cond) -> None:
        super().check_conditioning(cond)
        if cond.pooled is not None:
            raise ValueError("FLUX.2 reads no pooled text vector, but the conditioning has one: encode the captions "
                             "with the FLUX.2 model's own text encoder (Qwen3 for [klein], Mistral for [dev]).")

    def velocity(self, latents, sigmas, cond):
        self.check_conditioning(cond)
        dtype, device = self.compute_dtype, self.device
        latents = latents.to(device, dtype)
        conds = self.model.extra_conds(cross_attn=cond.context.to(device, dtype), noise=latents, device=device,
                                       guidance=cond.guidance)
        context = conds["c_crossattn"].cond
        timestep = self.model.model_sampling.timestep(sigmas.to(device)).float()
        guidance = self.guidance_tensor(cond.guidance, latents.shape[0])
        out = self.dit(latents, timestep, context, y=None, guidance=guidance,
                       transformer_options={"optimized_attention_override": sdpa_attention})
        return out.float()
