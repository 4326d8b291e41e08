"""The ComfyUI side of benchmarks/train_step.py: ComfyUI's FLUX.1 behind a ModelPatcher, and its
own TrainLoraNode timed on the same model and data (ComfyUI is imported only when they run)."""

from __future__ import annotations

import time

import torch


def comfy_model(shape: dict, weights: torch.dtype, device: torch.device, disable_dynamic: bool = True):
    """ComfyUI's FLUX behind a ModelPatcher, random weights (std 0.02, seeded), stored as
    `weights`. The patcher can rebuild itself, as ComfyUI's loaders' patchers can (v0.33's
    TrainLoraNode trains on such a fresh copy)."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.model_patcher

    unet = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
            "vec_in_dim": shape["pooled"], "context_in_dim": shape["context"], "hidden_size": shape["hidden"],
            "mlp_ratio": 4.0, "num_heads": shape["heads"], "depth": shape["double"],
            "depth_single_blocks": shape["single"], "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        unet["txt_ids_dims"] = []  # FLUX.1's text ids (v0.33 also knows FLUX.2's)
    config = comfy.model_detection.model_config_from_unet_config(unet)
    compute = torch.float32 if weights == torch.float32 else torch.bfloat16
    config.set_inference_dtype(weights, compute if weights != compute else None)
    model = config.get_model({}, device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.data = (torch.randn(p.shape, generator=g, device=device, dtype=compute) * 0.02).to(weights)
    model.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    patcher.cached_patcher_init = (comfy_model, (shape, weights, device))
    return patcher


def native(model, data, device, warmup: int, steps: int, rank: int) -> tuple[float, str]:
    """ComfyUI's TrainLoraNode on the same model and data: (seconds per step, settings)."""
    from comfy_extras import nodes_train

    latents, context, pooled = data
    cpu = device.type == "cpu"
    inputs = dict(model=model, latents={"samples": latents[None].to(device)},
                  positive=[[context[None].to(device), {"pooled_output": pooled[None].to(device), "guidance": 1.0}]],
                  batch_size=1, grad_accumulation_steps=1, learning_rate=1e-4, rank=rank, optimizer="AdamW",
                  loss_function="MSE", seed=0, training_dtype="none" if cpu else "bf16",
                  lora_dtype="fp32" if cpu else "bf16", algorithm="LoRA", gradient_checkpointing=True,
                  existing_lora="[None]")
    node = nodes_train.TrainLoraNode
    v3 = hasattr(node, "define_schema")
    candidates = [{"bypass_mode": False}, {"bypass_mode": True}] if v3 else [{}]
    best = None
    for extra in candidates:
        settings = dict(inputs, **extra)
        if v3:
            settings.update(quantized_backward=False, checkpoint_depth=1, offloading=False, bucket_mode=False)

        def run(n):
            started = time.perf_counter()
            with torch.inference_mode(False):
                if v3:
                    node.execute(**{k: [v] for k, v in dict(settings, steps=n).items()})
                else:
                    node().train(**dict(settings, steps=n))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        run(warmup)
        seconds = (run(warmup + steps) - run(warmup)) / steps
        label = "bypass_mode" if extra.get("bypass_mode") else "weight patching"
        if best is None or seconds < best[0]:
            best = (seconds, f"{label}, gradient_checkpointing, {'native dtype' if cpu else 'bf16'}")
    return best
