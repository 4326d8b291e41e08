"""Host tests: FLUX.1 Kontext edit LoRAs in a real ComfyUI (COMFYUI_PATH). ComfyUI's backend (the
reference as `ref_latents`) and diffusers' (FluxKontextPipeline's token layout) give the same loss
and LoRA gradients; the Kontext quickstart runs through ComfyUI's executor; its LoRA, through the
stock LoraLoader, changes ComfyUI's own Kontext edit (ReferenceLatent) of a reference image."""

import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch
from comfyui_host import PACK_DIR, by_type, requires_host, ui_to_api
from PIL import Image

pytestmark = requires_host

WORKFLOW = PACK_DIR / "example_workflows" / "flux_dreambooth_kontext_quickstart.json"
CONTROLS = PACK_DIR / "trainer" / "assets" / "kontext" / "controls"


def _diffusers_copy(model):
    """The loaded tiny FLUX's weights in diffusers' FluxTransformer2DModel, mapped with ComfyUI's
    own flux_to_diffusers."""
    import comfy.utils
    from diffusers import FluxTransformer2DModel

    sd = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    cfg = model.model.model_config.unet_config
    key_map = comfy.utils.flux_to_diffusers(cfg)
    reference = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=cfg["depth"], num_single_layers=cfg["depth_single_blocks"],
        attention_head_dim=128, num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_in_dim"],
        pooled_projection_dim=cfg["vec_in_dim"], guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    converted = {}
    for name in reference.state_dict():
        src = key_map[name]
        if isinstance(src, str):
            converted[name] = sd[src]
        elif src[1] is not None:
            converted[name] = sd[src[0]].narrow(*src[1])
        else:
            converted[name] = src[2](sd[src[0]])
    reference.load_state_dict(converted)
    return reference


def test_comfyui_and_diffusers_kontext_backends_agree(host):
    """The same weights with a reference image: the same velocity, loss and LoRA gradients from
    ComfyUI's ref_latents path and diffusers' concatenated reference tokens (ids at index 1), in
    the plain path and with blocks checkpointed and swapped; and the reference changes the result."""
    import comfy.model_management

    pack = host.pack
    T = pack.trainer
    with torch.inference_mode():
        model, _, _ = pack.nodes.host.tiny.load_tiny_flux(0, kontext=True)
        comfy.model_management.load_models_gpu([model])
    assert model.model.flux_dreambooth_name.startswith("tiny-flux1-kontext")
    reference = T.families.flux1.diffusers.DiffusersFlux(_diffusers_copy(model))
    host_backend = T.families.flux1.comfy.ComfyFlux(model.model, model.load_device,
                                                    pack.nodes.host.models.set_training_kernels)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", host_backend.dims, rank=4)
    torch.manual_seed(3)
    lat, noise, ref = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    Cond = T.families.conditioning.Conditioning
    cond = Cond(torch.randn(2, 7, 64), torch.randn(2, 64), 2.5, (ref,))
    sig = torch.tensor([0.3, 0.8])

    def step(backend, memory, c=cond):
        lora = T.lora.weights.LoraSet(spec.targets(backend.dims), seed=5)
        with torch.no_grad():
            for i, w in enumerate(lora):
                w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        with backend.training(lora, memory):
            v = backend.velocity(T.loop.flow.noisy_latents(lat, noise, sig), sig, c)
            loss = T.loop.flow.flow_matching_loss(v, T.loop.flow.velocity_target(lat, noise)).mean()
            loss.backward()
        return loss.item(), [p.grad for p in lora.parameters()]

    M = T.loop.memory.MemoryConfig
    ref_loss, ref_grads = step(reference, M("off"))
    for memory in (M("off"), M("blocks"), M("blocks", swap_blocks=3)):
        loss, grads = step(host_backend, memory)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max()
    plain, _ = step(host_backend, M("off"), Cond(cond.context, cond.pooled, 2.5))
    assert abs(plain - ref_loss) > 1e-4 * ref_loss  # the reference reaches the target's tokens


@pytest.fixture(scope="module")
def kontext_quickstart(host):
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), host.nodes.NODE_CLASS_MAPPINGS)
    started = time.perf_counter()
    outputs = host.run(prompt)
    return prompt, outputs, time.perf_counter() - started


def test_the_kontext_quickstart_trains_an_edit_lora_and_saves_it_as_kontext(host, kontext_quickstart):
    from safetensors import safe_open

    prompt, outputs, seconds = kontext_quickstart
    (train,) = by_type(prompt, "FluxDreamBoothTrain")
    before, after = outputs[train]["fixed_noise_loss"]
    assert after < 0.8 * before, (before, after)
    saved = outputs[by_type(prompt, "FluxDreamBoothSave")[0]]["text"][0]
    with safe_open(str(host.root / "loras" / saved), "pt") as f:
        header = f.metadata()
    assert header["dreambooth.family"] == "flux1" and header["dreambooth.variant"] == "kontext-dev"
    assert header["modelspec.architecture"] == "flux-1-kontext-dev/lora"
    assert header["dreambooth.base_model"].startswith("tiny-flux1-kontext")
    without, with_lora = (np.asarray(Image.open(host.output_file(outputs[k])), dtype=np.float32)
                          for k in by_type(prompt, "SaveImage"))
    assert np.abs(without - with_lora).mean() > 2.0
    samples = sorted((host.root / "output" / "flux_dreambooth").glob("kontext_quickstart_*/samples/step_*.png"))
    assert samples, "the validation renders (with the first control image as reference) were written"
    logging.getLogger(__name__).info("Kontext quickstart ran in %.1f s on ComfyUI %s", seconds, host.version)


def _edit(host, lora_name: str | None, image: str, strength: float = 1.0) -> np.ndarray:
    """ComfyUI's stock Kontext edit of input/`image`: LoadImage → VAE Encode → ReferenceLatent →
    FluxGuidance → KSampler, with the LoRA through the stock LoraLoader."""
    model, clip = ["1", 0], ["1", 1]
    prompt = {"1": {"class_type": "FluxDreamBoothTinyFlux",
                    "inputs": {"seed": 0, "weight_dtype": "default", "family": "FLUX.1 Kontext"}}}
    if lora_name:
        prompt["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                                              "strength_model": strength, "strength_clip": strength}}
        model, clip = ["2", 0], ["2", 1]
    prompt.update({
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "make the circle red"}},
        "6": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["5", 0], "latent": ["4", 0]}},
        "7": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 2.5}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["7", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], "seed": 1, "steps": 8, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "kontext_edit"}}})
    return np.asarray(Image.open(host.output_file(host.run(prompt)["11"])), dtype=np.float32)


def test_the_saved_lora_through_the_stock_loader_changes_the_edit_of_the_reference(host, kontext_quickstart, caplog):
    prompt, outputs, _ = kontext_quickstart
    saved = outputs[by_type(prompt, "FluxDreamBoothSave")[0]]["text"][0]
    for name in ("01_blue_circle.png", "02_green_circle.png"):
        shutil.copy(CONTROLS / name, host.root / "input" / name)
    with caplog.at_level(logging.WARNING):
        edited = _edit(host, saved, "01_blue_circle.png")
    assert "lora key not loaded" not in caplog.text
    base = _edit(host, None, "01_blue_circle.png")
    other = _edit(host, saved, "02_green_circle.png")
    assert np.abs(edited - base).mean() > 2.0  # the LoRA changes the edit
    # and the edit reads its reference image (ReferenceLatent reaches the model; at random toy weights the
    # reference moves the render only slightly, but any reference ComfyUI dropped would leave it unchanged)
    assert not np.array_equal(edited, other)
