"""FLUX.1 [dev], [schnell], Krea and fine-tunes of them: ComfyUI's `comfy.ldm.flux` model with
per-block modulation, 16-channel latents in 2×2 patches, T5 tokens and a pooled CLIP vector."""
