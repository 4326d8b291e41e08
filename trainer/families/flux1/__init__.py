"""FLUX.1 [dev], [schnell], Krea and fine-tunes of them: ComfyUI's `comfy.ldm.flux` model with
per-block modulation, 16-channel latents in 2×2 patches, T5 tokens and a pooled CLIP vector."""

from ..spec import Family
from .layers import VOCABULARY, FluxDims

FAMILY = Family(name="flux1", label="FLUX.1", vocabulary=VOCABULARY, layout=FluxDims, latent_channels=16,
                patch_size=2, timestep_sampling="flux_shift", pooled=True, modelspec="flux-1",
                variants=("dev", "schnell"))
