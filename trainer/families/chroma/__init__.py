"""Chroma (Chroma1-Base, -HD, -Flash and the unlocked v-releases): FLUX.1 [schnell]'s blocks with
their per-block modulation layers pruned away. One model-level `distilled_guidance_layer` (an MLP
over σ, guidance 0 and each modulation slot's index) makes every block's shift/scale/gate, so
blocks read their modulation as ComfyUI's ModulationOut tuples, as FLUX.2's do. 16-channel latents
in 2×2 patches (FLUX.1's VAE), T5 tokens only: no pooled vector, no CLIP-L, no guidance embedding.

Timesteps: FLUX.1's resolution-dependent shift (`flux_shift`), as ai-toolkit trains Chroma (its
Chroma scheduler is FLUX.1's: dynamic shifting, 0.5 at 256 tokens to 1.15 at 4096).
"""

from ..spec import Family
from .layers import VOCABULARY, ChromaDims

# No guidance embedding in any Chroma: both variants name the one architecture ("chroma/lora").
FAMILY = Family(name="chroma", label="Chroma", vocabulary=VOCABULARY, layout=ChromaDims, latent_channels=16,
                patch_size=2, timestep_sampling="flux_shift", pooled=False, modelspec="chroma", variants=("", ""))
