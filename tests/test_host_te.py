"""Host tests (COMFYUI_PATH): the text encoder trained too (Training Settings' text_encoder_lr),
through ComfyUI's executor on the tiny FLUX; the file through the stock Load LoRA (model + clip)."""

import logging

import numpy as np
import pytest
from comfyui_host import requires_host, train_prompt
from PIL import Image

pytestmark = requires_host

SETTINGS = {"optimizer": "adamw", "optimizer_args": "", "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
            "lr_num_cycles": 1, "lr_power": 1.0, "lr_end": 4e-7, "shift": 1.0, "logit_mean": 0.0, "logit_std": 1.0,
            "mode_scale": 1.29, "loss": "mse", "huber_c": 0.1, "loss_weighting": "none",
            "text_encoder_lr": 1e-2, "text_encoder_start": 0.5, "text_encoder_rank": 4, "text_encoder_t5": False}
PROMPT = "a photo of sks toy"
UNLOADED = ("lora key not loaded", "NOT LOADED")


def render(model, clip, vae, prefix: str) -> dict:
    """CLIPTextEncode → KSampler (cfg 1) → VAEDecode → SaveImage, as nodes "30"…"34"."""
    return {
        "30": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": PROMPT}},
        "31": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "32": {"class_type": "KSampler", "inputs": {"model": model, "seed": 1, "steps": 4, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["30", 0], "negative": ["30", 0],
                                                   "latent_image": ["31", 0], "denoise": 1.0}},
        "33": {"class_type": "VAEDecode", "inputs": {"samples": ["32", 0], "vae": vae}},
        "34": {"class_type": "SaveImage", "inputs": {"images": ["33", 0], "filename_prefix": prefix}},
    }


def pixels(host, ui) -> np.ndarray:
    return np.asarray(Image.open(host.output_file(ui)), dtype=np.float32)


@pytest.fixture(scope="module")
def trained(host):
    """6 steps, CLIP-L from step 4 on, a validation render inside its phase; saved in both formats
    (fp32, so a reload is exact); the Train node's MODEL and CLIP rendered once."""
    prompt = train_prompt(steps=6, settings=["6", 0], validation=["7", 0])
    prompt["6"] = {"class_type": "FluxDreamBoothTrainingSettings", "inputs": dict(SETTINGS)}
    prompt["7"] = {"class_type": "FluxDreamBoothValidation",
                   "inputs": {"prompts": "a photo of [trigger]", "seeds": "1", "guidance": "3.5", "sample_steps": "2",
                              "width": 64, "height": 64, "every_n_steps": 5, "sampler_name": "euler",
                              "scheduler": "simple", "before_training": False}}
    prompt["5"]["inputs"].update(filename_prefix="checks/te", precision="fp32")
    prompt["8"] = {"class_type": "FluxDreamBoothSave", "inputs": {"lora": ["4", 1], "filename_prefix": "checks/te_d",
                                                                  "format": "diffusers", "precision": "fp32"}}
    prompt.update(render(["4", 0], ["4", 6], ["1", 2], "te_in_memory"))
    outputs = host.run(prompt)
    return outputs, outputs["5"]["text"][0], outputs["8"]["text"][0]


def test_the_clip_part_trains_and_is_named_in_the_summary(host, trained):
    outputs, kohya, _ = trained
    summary = outputs["4"]["text"][0]
    assert "on clip_l from step 3 at 0.01" in summary, summary
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(host.root / "loras" / kohya))
    ups = [k for k in sd if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert len(ups) == 12 and all(sd[k].abs().sum() > 0 for k in ups)


@pytest.mark.parametrize("which", ["kohya", "diffusers"])
def test_comfyui_loads_every_key_of_both_parts(host, trained, which, caplog):
    import comfy.lora
    import comfy.utils

    name = trained[1] if which == "kohya" else trained[2]
    model, clip, _ = host.pack.nodes.host.tiny.load_tiny_flux(0)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    sd = comfy.utils.load_torch_file(str(host.root / "loras" / name))
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert not any(u in caplog.text for u in UNLOADED), caplog.text
    modules = sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in sd)
    assert len(patches) == modules
    targets = [k if isinstance(k, str) else k[0] for k in patches]  # a diffusers slice of a fused layer: (key, slice)
    assert sum(k.startswith("clip_l.transformer.text_model.encoder.layers.") for k in targets) == 12


def test_stock_load_lora_gives_the_train_nodes_model_and_clip(host, trained, caplog):
    """LoraLoader (model + clip) on the saved file renders the Train node's outputs exactly; without
    its CLIP part (strength_clip 0) the render differs, and so does the CLIP's pooled vector."""
    outputs, kohya, _ = trained
    in_memory = pixels(host, outputs["34"])
    images = {}
    for strength_clip in (1.0, 0.0):
        replay = {"1": {"class_type": "FluxDreamBoothTinyFlux", "inputs": {"seed": 0, "weight_dtype": "default"}},
                  "20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": kohya,
                                                                "strength_model": 1.0,
                                                                "strength_clip": strength_clip}}}
        replay.update(render(["20", 0], ["20", 1], ["1", 2], f"te_replay_{strength_clip:g}"))
        with caplog.at_level(logging.WARNING):
            images[strength_clip] = pixels(host, host.run(replay)["34"])
    assert not any(u in caplog.text for u in UNLOADED), caplog.text
    assert np.array_equal(images[1.0], in_memory)
    assert np.abs(images[1.0] - images[0.0]).mean() > 0

    model, clip, _ = host.pack.nodes.host.tiny.load_tiny_flux(0)
    _, with_lora = host.nodes.LoraLoader().load_lora(model, clip, kohya, 1.0, 1.0)
    plain_cond, plain_pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
    cond, pooled = with_lora.encode_from_tokens(with_lora.tokenize(PROMPT), return_pooled=True)
    assert (pooled - plain_pooled).abs().max() > 1e-4
    assert cond.equal(plain_cond)  # T5 was not trained: its tokens are as they were


def test_t5_trains_too_when_asked(host):
    prompt = train_prompt(steps=2, settings=["6", 0])
    prompt["6"] = {"class_type": "FluxDreamBoothTrainingSettings",
                   "inputs": {**SETTINGS, "text_encoder_t5": True, "text_encoder_start": 0.0}}
    prompt["5"]["inputs"]["filename_prefix"] = "checks/te_t5"
    outputs = host.run(prompt)
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(host.root / "loras" / outputs["5"]["text"][0]))
    t5 = [k for k in sd if k.startswith("lora_te3_encoder_block_") and k.endswith("lora_up.weight")]
    assert len(t5) == 2 * 7 and all(sd[k].abs().sum() > 0 for k in t5)


def test_a_start_past_the_end_is_named_before_anything_is_written(host):
    prompt = train_prompt(steps=4, settings=["6", 0])
    prompt["6"] = {"class_type": "FluxDreamBoothTrainingSettings", "inputs": {**SETTINGS, "text_encoder_start": 4}}
    with pytest.raises(RuntimeError, match="text_encoder_start is 4: step 4, at or past steps"):
        host.run(prompt)


def test_comfyuis_clip_embeds_live_as_clip_text_encode_does_with_a_gradient_through_both(host):
    """At zero LoRA the live embeddings are the cached ones; backward runs through CLIP-L's and T5's
    in-place residual streams (protected) and reaches every layer's LoRA."""
    import torch

    pack = host.pack
    te, LoraSet = pack.trainer.lora.text_encoder, pack.trainer.lora.weights.LoraSet
    model, clip, vae = pack.nodes.host.tiny.load_tiny_flux(0)
    cached_context, cached_pooled = pack.nodes.host.models.ComfyEncoders(model, clip, vae).encode_text(PROMPT)
    text = pack.trainer.families.flux1.comfy_text.ComfyText(clip, load=lambda: None)
    both = (te.CLIP_L, te.T5XXL)
    lora = LoraSet(te.targets(text, both, 4))
    assert len(lora) == 2 * 6 + 2 * 7
    with torch.inference_mode(False), torch.enable_grad(), te.applied(text, lora):
        context, pooled = text.encode(PROMPT, both)
        (context.square().mean() + pooled.square().mean()).backward()
    assert torch.allclose(context, cached_context, atol=1e-5) and torch.allclose(pooled, cached_pooled, atol=1e-5)
    assert all(w.up.grad is not None and w.up.grad.abs().sum() > 0 for w in lora)
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in clip.cond_stage_model.modules())
