"""Host tests: the FLUX.2 quickstart workflow through ComfyUI's own executor (COMFYUI_PATH). The Tiny
FLUX node's FLUX.2 (ComfyUI's own FLUX.2 transformer, Qwen3 text encoder and 128-channel VAE at toy
widths) trains from the browser's workflow, renders samples through ComfyUI's sampler, and saves a
LoRA the stock LoraLoader applies with every key, computing what the trained MODEL computes. A
ComfyUI without FLUX.2 refuses the family by name."""

import json
import logging
import time

import numpy as np
import pytest
import torch
from comfyui_host import PACK_DIR, by_type, requires_host, ui_to_api
from PIL import Image

pytestmark = requires_host

WORKFLOW = PACK_DIR / "example_workflows" / "flux_dreambooth_quickstart_flux2.json"


def has_flux2() -> bool:
    import comfy.model_base

    return hasattr(comfy.model_base, "Flux2")


def pixels(host, ui) -> np.ndarray:
    return np.asarray(Image.open(host.output_file(ui)), dtype=np.float32)


@pytest.fixture(scope="module")
def quickstart(host):
    """The shipped FLUX.2 quickstart, run once, with a second Save node writing fp32."""
    if not has_flux2():
        pytest.skip("this ComfyUI has no FLUX.2")
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), host.nodes.NODE_CLASS_MAPPINGS)
    (save,) = by_type(prompt, "FluxDreamBoothSave")
    prompt["900"] = {"class_type": "FluxDreamBoothSave", "inputs": {**prompt[save]["inputs"], "precision": "fp32",
                                                                     "filename_prefix": "flux2_quickstart/exact"}}
    started = time.perf_counter()
    outputs = host.run(prompt)
    return prompt, outputs, time.perf_counter() - started


def test_the_tiny_flux_node_refuses_flux2_by_name_on_a_comfyui_without_it(host):
    if has_flux2():
        pytest.skip("this ComfyUI has FLUX.2")
    prompt = {"1": {"class_type": "FluxDreamBoothTinyFlux", "inputs": {"seed": 0, "weight_dtype": "default",
                                                                       "family": "FLUX.2"}},
              "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    with pytest.raises(RuntimeError, match=r"FLUX.2 needs ComfyUI ≥ 0\.3\.72.*this ComfyUI is 0\.3\.64"):
        host.run(prompt)


def test_flux2_quickstart_trains_renders_samples_and_saves(host, quickstart):
    prompt, outputs, seconds = quickstart
    (train,) = by_type(prompt, "FluxDreamBoothTrain")
    before, after = outputs[train]["fixed_noise_loss"]
    logging.getLogger(__name__).info("FLUX.2 quickstart ran in %.1f s on ComfyUI %s; fixed-noise loss %.4f -> %.4f",
                                     seconds, host.version, before, after)
    assert after < 0.8 * before, (before, after)
    runs = sorted((host.root / "output" / "flux_dreambooth").glob("quickstart_flux2_*"))
    samples = sorted(runs[-1].rglob("step_*.png"))
    assert {p.name for p in samples} >= {f"step_{s:06d}_{i:02d}.png" for s in (0, 20, 40) for i in (0, 1)}
    assert "(or --model tiny --family flux2, the embedded tiny one)" in (runs[-1] / "recipe.yaml").read_text()
    first = np.asarray(Image.open(samples[0]))
    assert first.shape == (128, 128, 3) and first.std() > 1.0  # a rendered image, not a blank
    saved = outputs[by_type(prompt, "FluxDreamBoothSave")[0]]["text"][0]
    assert saved.startswith("flux_dreambooth/flux2_quickstart_") and (host.root / "loras" / saved).is_file()
    without, with_lora = (pixels(host, outputs[k]) for k in by_type(prompt, "SaveImage"))
    assert np.abs(without - with_lora).mean() > 2.0


def test_the_saved_flux2_lora_loads_in_the_stock_loader_with_every_key_and_renders_the_trained_model(
        host, quickstart, caplog):
    """The fp32 file through LoraLoaderModelOnly: every key a patch, the same velocity as the Train
    node's MODEL (the replayed KSampler's image is the in-memory one, bit for bit)."""
    import comfy.lora
    import comfy.utils

    prompt, outputs, _ = quickstart
    loras = host.root / "loras"  # the FLUX.1 host tests save their own exact_* files beside these
    (name,) = [p.relative_to(loras).as_posix() for p in (loras / "flux2_quickstart").rglob("exact_*")]
    sd = comfy.utils.load_torch_file(str(host.root / "loras" / name))
    model = host.pack.nodes.host.tiny.load_tiny_flux2(0)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == sum(k.endswith(".lora_down.weight") for k in sd) == 2 * 4 + 2 * 2  # qkv/proj ×2; linear1/2

    sampler = by_type(prompt, "KSampler")[1]  # the one fed by the Train node's MODEL
    (loader,) = by_type(prompt, "FluxDreamBoothTinyFlux")
    replay = {k: json.loads(json.dumps(v)) for k, v in prompt.items()
              if v["class_type"] in ("FluxDreamBoothTinyFlux", "CLIPTextEncode", "EmptySD3LatentImage")}
    replay["50"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [loader, 0], "lora_name": name,
                                                                    "strength_model": 1.0}}
    replay["51"] = {"class_type": "KSampler", "inputs": {**prompt[sampler]["inputs"], "model": ["50", 0]}}
    replay["52"] = {"class_type": "VAEDecode", "inputs": {"samples": ["51", 0], "vae": [loader, 2]}}
    replay["53"] = {"class_type": "SaveImage", "inputs": {"images": ["52", 0], "filename_prefix": "replay_flux2"}}
    from_file = pixels(host, host.run(replay)["53"])
    _, in_memory = (pixels(host, outputs[k]) for k in by_type(prompt, "SaveImage"))
    assert np.array_equal(from_file, in_memory)


def test_the_tiny_flux2_set_matches_what_the_model_expects(host):
    """The CLIP's context is as wide as the transformer reads, the VAE's latents have FLUX.2's 128
    channels at 1/16, and one caption encodes to FLUX.2's 512 tokens with no pooled vector."""
    if not has_flux2():
        pytest.skip("this ComfyUI has no FLUX.2")
    model, clip, vae = host.pack.nodes.host.tiny.TINY_FAMILIES["FLUX.2"](0, "default")
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of sks toy"), return_pooled=True)
    dit = model.model.diffusion_model
    assert pooled is None and cond.shape == (1, 512, dit.txt_in.weight.shape[1])
    latents = vae.encode(torch.rand(1, 64, 48, 3))
    assert latents.shape == (1, 128, 4, 3) == (1, model.model.latent_format.latent_channels, 64 // 16, 48 // 16)
    assert vae.decode(latents).shape == (1, 64, 48, 3)


def test_a_comfyui_with_flux2_but_without_klein_refuses_the_tiny_flux2_by_name(host, monkeypatch):
    """FLUX.2 [dev] came before [klein]'s Qwen3 text encoder (0.3.72 vs 0.9.2): such a ComfyUI is told so."""
    import comfy.text_encoders.flux

    if not has_flux2():
        pytest.skip("this ComfyUI has no FLUX.2")
    monkeypatch.delattr(comfy.text_encoders.flux, "klein_te")
    with pytest.raises(ValueError, match=rf"needs ComfyUI ≥ 0\.9\.2; this ComfyUI is {host.version}\. Update"):
        host.pack.nodes.host.tiny.TINY_FAMILIES["FLUX.2"](0, "default")
