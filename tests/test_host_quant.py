"""Host tests: training on a quantized base as low-VRAM ComfyUI users load it.

GGUF: the tiny FLUX's weights written to .gguf files (Q8_0, Q4_K, Q4_0, Q5_1) in the layout city96's
ComfyUI-GGUF reads, loaded through its own Unet Loader (GGUF) node. int8: the Training Settings
node's base_quantization (torchao). Each is held to the bf16 model's fixed-noise loss and first-step
LoRA gradients within the tolerance the README documents (Speed and memory), and every memory mode
to the plain path on the same quantized weights.

Needs COMFYUI_PATH; the GGUF tests also ComfyUI-GGUF in its custom_nodes and the `gguf` package,
the int8 tests `torchao`: each is skipped, saying which, without them.
"""

import asyncio
import importlib.util
import logging
from pathlib import Path

import gguf_files
import numpy as np
import pytest
import torch
from comfyui_host import COMFYUI_PATH, requires_host, train_prompt
from test_host import _loss_and_lora_grads
from test_host_jobs import VALIDATION

log = logging.getLogger(__name__)
GGUF_PACK = Path(COMFYUI_PATH or ".") / "custom_nodes" / "ComfyUI-GGUF"
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the gguf package is not installed (pip install gguf)")
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install torchao)")

# The documented tolerance (README, Speed and memory), with about 2x margin over what was measured on
# the tiny FLUX on both hosts (in the comments): the fixed-noise loss relative to bf16's, and the first
# step's LoRA gradients against bf16's (cosine; norm of the difference relative to bf16's norm).
TOLERANCE = {  # name: (loss, cosine at least, gradient error)
    "Q8_0": (0.01, 0.999, 0.05),  # measured 0.003%, 0.99995, 1.1%
    "Q5_1": (0.02, 0.99, 0.15),  # 0.06%, 0.9973, 7.3%
    "Q4_K": (0.05, 0.97, 0.30),  # 0.03%, 0.9910, 14%
    "Q4_0": (0.05, 0.97, 0.30),  # 0.17%, 0.9855, 17%
    "int8": (0.01, 0.999, 0.05),  # 0.002%, 0.99999, 0.6%
}

def _batch():
    torch.manual_seed(3)
    lat, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    return lat, noise, torch.randn(1, 7, 64), torch.randn(1, 64), torch.tensor([0.6])


def _step(host, model, memory):
    T, pack = host.pack.trainer, host.pack
    kernels = pack.nodes.host.models.set_training_kernels
    backend = T.families.flux1.comfy.ComfyFlux(model.model, model.load_device, kernels)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    loss, grads = _loss_and_lora_grads(T, backend, spec, memory, _batch(), guidance=1.0)
    return loss, torch.cat([g.flatten() for g in grads])


def _tiny(host, weight_dtype="bf16"):
    import comfy.model_management

    with torch.inference_mode():  # as inside a node
        model, clip, vae = host.pack.nodes.host.tiny.load_tiny_flux(0, weight_dtype)
        comfy.model_management.load_models_gpu([model])
    return model


@pytest.fixture(scope="module")
def bf16_reference(host):
    return _step(host, _tiny(host), host.pack.trainer.loop.memory.MemoryConfig("off"))


def _compare(name, loss, grads, reference):
    ref_loss, ref_grads = reference
    loss_diff = abs(loss / ref_loss - 1)
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
    grad_diff = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    log.warning("%s vs bf16: loss %.5f vs %.5f (%.3f%%), LoRA gradients cosine %.5f, relative error %.2f%%",
                name, loss, ref_loss, 100 * loss_diff, cosine, 100 * grad_diff)
    max_loss, min_cosine, max_grad = TOLERANCE[name]
    assert loss_diff <= max_loss and cosine >= min_cosine and grad_diff <= max_grad, (name, loss_diff, cosine)


# --- GGUF ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_files_on_host(host, tmp_path_factory):
    """ComfyUI-GGUF loaded into the host the way ComfyUI loads custom nodes, and the tiny FLUX
    written as one .gguf file per type into a diffusion_models folder."""
    if not GGUF_PACK.is_dir():
        pytest.skip(f"ComfyUI-GGUF is not in {GGUF_PACK.parent} (custom_nodes): the GGUF tests load it from there")
    if "UnetLoaderGGUF" not in host.nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(host.nodes.load_custom_node(str(GGUF_PACK))), "ComfyUI could not load ComfyUI-GGUF"
    folder = tmp_path_factory.mktemp("diffusion_models")
    host.folder_paths.add_model_folder_path("diffusion_models", str(folder))
    model, _, _ = host.pack.nodes.host.tiny.load_tiny_flux(0)  # fp32, BFL keys as ComfyUI holds them
    state_dict = model.model.diffusion_model.state_dict()
    written = {q: gguf_files.write(folder / f"tiny-flux-{q}.gguf", state_dict, q) for q in TOLERANCE if q != "int8"}
    return folder, written


def _load_gguf(host, name):
    """The Unet Loader (GGUF) node's MODEL, as a workflow gets it (in inference mode)."""
    import comfy.model_management

    loader = host.nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]()
    with torch.inference_mode(), host.pack.nodes.host.tiny._widths_from_weights():
        (model,) = loader.load_unet(name)
        comfy.model_management.load_models_gpu([model])
    return model


@needs_gguf
def test_the_q4_k_writer_packs_what_gguf_py_unpacks():
    """The test's own Q4_K packing, read back by gguf-py's reference dequantizer: errors of a 4-bit
    fit (and larger than Q8_0's), so a Q4_K file really is 4-bit."""
    import gguf

    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    q4 = gguf.quants.dequantize(gguf_files.q4_k(x), gguf.GGMLQuantizationType.Q4_K)
    q8 = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                                gguf.GGMLQuantizationType.Q8_0)
    assert q4.shape == x.shape
    err4, err8 = np.abs(q4 - x).mean(), np.abs(q8 - x).mean()
    assert 5 * err8 < err4 < 0.12 * np.abs(x).mean(), (err4, err8)


@requires_host
@needs_gguf
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_K", "Q4_0"])
def test_gguf_model_trains_within_the_documented_tolerance_of_bf16(host, gguf_files_on_host, bf16_reference, qtype):
    """A GGUF model from ComfyUI-GGUF's loader: loss and LoRA gradients within the tolerance of
    bf16's; every memory mode gives the plain path's result on it; its packed weights are only
    read (same type, same bytes, no gradient)."""
    _, written = gguf_files_on_host
    assert written[qtype][qtype] >= 30  # the blocks' Linear weights are in that type
    model = _load_gguf(host, f"tiny-flux-{qtype}.gguf")
    assert host.pack.nodes.host.models.weight_dtype_name(model) == f"GGUF {qtype}"
    dit = model.model.diffusion_model
    weight = dit.single_blocks[0].linear1.weight
    assert getattr(weight.tensor_type, "name", None) == qtype
    packed = weight.as_subclass(torch.Tensor).clone()

    M = host.pack.trainer.loop.memory.MemoryConfig
    loss, grads = _step(host, model, M("off"))
    _compare(qtype, loss, grads, bf16_reference)
    for memory in (M("blocks"), M("blocks", checkpoint_every=2), M("offload", swap_blocks=4)):
        other_loss, other_grads = _step(host, model, memory)
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(other_grads, grads, rtol=1e-3, atol=1e-5 * grads.abs().max())
    weight = dit.single_blocks[0].linear1.weight
    assert getattr(weight.tensor_type, "name", None) == qtype
    assert torch.equal(weight.as_subclass(torch.Tensor), packed)
    assert all(not p.requires_grad and p.grad is None for p in dit.parameters())


@requires_host
@needs_gguf
def test_train_node_on_a_gguf_model_renders_and_swaps_as_on_bf16(host, gguf_files_on_host):
    """The Train node on Unet Loader (GGUF)'s MODEL trains (the loss falls); rendering validation
    samples in between and swapping blocks change nothing of it."""
    def run(validation=False, **train_inputs):
        prompt = train_prompt(steps=6, **train_inputs)
        prompt["10"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny-flux-Q4_K.gguf"}}
        prompt["4"]["inputs"]["model"] = ["10", 0]
        if validation:
            prompt["20"] = {"class_type": "FluxDreamBoothValidation", "inputs": dict(VALIDATION)}
            prompt["4"]["inputs"]["validation"] = ["20", 0]
        with host.pack.nodes.host.tiny._widths_from_weights():
            outputs = host.run(prompt)
        return outputs["4"]["fixed_noise_loss"], outputs["4"]["text"][0]

    (before, after), summary = run()
    assert np.isfinite([before, after]).all() and after < before
    assert "GGUF Q4_K weights" in summary
    rendered, _ = run(validation=True)
    assert rendered == pytest.approx([before, after], rel=1e-5)
    swapped, _ = run(swap_blocks=2)
    assert swapped == pytest.approx([before, after], rel=1e-4)


@requires_host
@needs_gguf
@needs_torchao
def test_int8_on_a_gguf_model_is_refused_by_name(host, gguf_files_on_host):
    model = _load_gguf(host, "tiny-flux-Q8_0.gguf")
    with pytest.raises(ValueError) as e:
        host.pack.nodes.host.models.check_base_quantization(model, "int8")
    assert "base_quantization is int8, but this MODEL's weights are GGUF Q8_0 already" in str(e.value)


# --- int8 (torchao) --------------------------------------------------------------------------------

@requires_host
@needs_torchao
@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16"])
def test_int8_base_trains_within_the_documented_tolerance_and_gives_the_model_back(host, bf16_reference,
                                                                                   weight_dtype):
    """base_quantization int8 on a bf16 or fp16 MODEL: the blocks' weights are torchao's int8
    while inside, the loss and gradients within the tolerance of bf16's in every checkpointing mode,
    block swap included, and afterwards the model has its own weight objects back, values untouched."""
    pack = host.pack
    model = _tiny(host, weight_dtype)
    backend, patcher = pack.nodes.host.models.flux_backend(model)
    layer = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    original, values = layer.weight, layer.weight.detach().clone()
    M = pack.trainer.loop.memory.MemoryConfig
    with pack.nodes.host.models.quantized_base(patcher, backend, "int8") as quantized:
        # per double block: mod, qkv, proj, 2 MLP layers, of img and txt; per single block: mod, linear1, linear2
        assert len(quantized.originals) == 2 * 10 + 4 * 3
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (layer.out_features, 1)
        pack.nodes.host.models.load_for_training(patcher)
        results = [_step(host, model, memory) for memory in (M("off"), M("blocks"), M("offload", swap_blocks=4))]
    assert layer.weight is original and torch.equal(layer.weight, values)
    loss, grads = results[0]
    if weight_dtype == "bf16":
        _compare("int8", loss, grads, bf16_reference)
    for other_loss, other_grads in results[1:]:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(other_grads, grads, rtol=1e-3, atol=1e-5 * grads.abs().max())


SETTINGS = {"optimizer": "adamw", "optimizer_args": "", "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
            "lr_num_cycles": 1, "lr_power": 1.0, "lr_end": 4e-7, "shift": 1.0, "logit_mean": 0.0, "logit_std": 1.0,
            "mode_scale": 1.29, "loss": "mse", "huber_c": 0.1, "loss_weighting": "none"}


@requires_host
@needs_torchao
def test_train_node_with_base_quantization_int8_renders_and_swaps_as_without(host):
    """Training Settings' base_quantization int8 on a bf16 MODEL: the loss falls; validation
    renders in between (the LoRA on activations: ComfyUI can't merge it into int8) and block swap
    change nothing of it."""
    def run(validation=False, **train_inputs):
        prompt = train_prompt(steps=6, settings=["11", 0], **train_inputs)
        prompt["1"]["inputs"]["weight_dtype"] = "bf16"
        prompt["11"] = {"class_type": "FluxDreamBoothTrainingSettings",
                        "inputs": {**SETTINGS, "base_quantization": "int8"}}
        if validation:
            prompt["20"] = {"class_type": "FluxDreamBoothValidation", "inputs": dict(VALIDATION)}
            prompt["4"]["inputs"]["validation"] = ["20", 0]
        outputs = host.run(prompt)
        return outputs["4"]["fixed_noise_loss"], outputs["4"]["text"][0]

    (before, after), summary = run()
    assert np.isfinite([before, after]).all() and after < before
    assert "bf16 weights" in summary and "int8 base weights" in summary
    rendered, _ = run(validation=True)
    assert rendered == pytest.approx([before, after], rel=1e-5)
    swapped, _ = run(swap_blocks=2)
    assert swapped == pytest.approx([before, after], rel=1e-4)


@requires_host
@needs_torchao
def test_int8_on_an_fp8_model_is_refused_by_name(host):
    prompt = train_prompt(settings=["11", 0])
    prompt["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    prompt["11"] = {"class_type": "FluxDreamBoothTrainingSettings",
                    "inputs": {**SETTINGS, "base_quantization": "int8"}}
    with pytest.raises(RuntimeError) as e:
        host.run(prompt)
    assert "base_quantization is int8, but this MODEL's weights are fp8_e4m3fn already" in str(e.value)
