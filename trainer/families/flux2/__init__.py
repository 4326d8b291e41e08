"""FLUX.2 [klein] 4B / 9B (base or distilled) and [dev]: ComfyUI's `comfy.ldm.flux` model with
shared (model-level) modulation, SwiGLU MLPs, no biases, 128-channel latents one token per latent
pixel, Qwen3 (klein) or Mistral (dev) hidden states padded to 512 tokens, no pooled vector, and a
guidance embedding on [dev] only."""

from ..spec import Family
from .layers import VOCABULARY, Flux2Dims

FAMILY = Family(name="flux2", label="FLUX.2", vocabulary=VOCABULARY, layout=Flux2Dims, latent_channels=128,
                patch_size=1, timestep_sampling="flux2_shift", pooled=False, modelspec="flux-2",
                variants=("dev", "klein"), downscale=16)

MIN_COMFYUI = "0.3.72"  # FLUX.2 [dev] came in ComfyUI 0.3.72; [klein]'s text encoder in 0.9.2
MIN_COMFYUI_KLEIN = "0.9.2"
