"""Host test: a FLUX.2 LoRA on the shared modulation layers (double_stream_modulation_img/txt,
single_stream_modulation), next to block layers, on ComfyUI's own FLUX.2: its kohya file goes
through the stock LoraLoader with every key recognised and computes what the LoRA computed in
training; and ComfyUI's backend agrees with diffusers' on the modulation LoRA's gradients."""

import logging

import pytest
import torch
from comfyui_host import requires_host

pytestmark = requires_host

TEXT = 96  # the tiny FLUX.2's text width (nodes/host/tiny.py TINY_FLUX2 context_in_dim)
MODULATION = ("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
              "single_stream_modulation.linear")


@pytest.fixture
def flux2(host):
    import comfy.model_base

    if not hasattr(comfy.model_base, "Flux2"):
        pytest.skip("this ComfyUI has no FLUX.2")
    return host.pack


def _spec(T):
    G = T.lora.targets.LayerGroup
    return T.lora.targets.LayerSpec((G("transformer_blocks", 0, 2, ("attn.to_q", "ff.linear_in"), 4),
                                     G("single_transformer_blocks", 0, 2, ("attn.to_v", "attn.to_out"), 4),
                                     G("modulation", 0, 1, MODULATION, 2, 4.0)))


def _lora(T, dims):
    lora = T.lora.weights.LoraSet(_spec(T).targets(dims), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in lora:
            w.up.copy_(torch.randn(w.up.shape, generator=g) * 0.05)
    return lora


def test_modulation_lora_file_loads_with_every_key_in_the_stock_lora_loader(flux2, host, caplog):
    import comfy.lora
    import comfy.model_management
    from safetensors.torch import save_file

    T = flux2.trainer
    with torch.inference_mode():
        model = flux2.nodes.host.tiny.load_tiny_flux2(0)
        comfy.model_management.load_models_gpu([model])
    backend, _ = flux2.nodes.host.models.flux_backend(model)
    lora = _lora(T, backend.dims)
    sd = T.outputs.export.kohya_state_dict(lora)
    assert {"lora_unet_double_stream_modulation_img_lin.lora_up.weight",
            "lora_unet_single_stream_modulation_lin.alpha"} <= set(sd)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len({k.split(".")[0] for k in sd}) == 2 * 2 + 2 * 2 + 3
    assert "diffusion_model.double_stream_modulation_txt.lin.weight" in patches

    torch.manual_seed(4)
    cond = T.families.conditioning.Conditioning(torch.randn(1, 7, TEXT))
    args = (torch.randn(1, 128, 4, 4), torch.tensor([0.6]), cond)
    with torch.no_grad():
        base = backend.velocity(*args)
        with backend.lora_applied(lora):
            trained = backend.velocity(*args)
    name = "flux2/tiny_flux2_modulation.safetensors"
    (host.root / "loras" / "flux2").mkdir(parents=True, exist_ok=True)
    save_file(sd, str(host.root / "loras" / name))
    (patched,) = host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        from_file = flux2.nodes.host.models.flux_backend(patched)[0].velocity(*args)
    change, error = (trained - base).abs().max(), (from_file - trained).abs().max()
    assert change > 1e-3 and error < 1e-3 * change, (change, error)


def test_comfyui_and_diffusers_agree_on_the_modulation_lora(flux2):
    from importlib import import_module

    from diffusers import Flux2Transformer2DModel

    T = flux2.trainer
    pkg = f"{flux2.__name__}.trainer.families.flux2"
    bfl, DiffusersFlux2 = import_module(f"{pkg}.bfl"), import_module(f"{pkg}.diffusers").DiffusersFlux2
    with torch.inference_mode():
        model = flux2.nodes.host.tiny.load_tiny_flux2(0)
    host_backend, _ = flux2.nodes.host.models.flux_backend(model)
    state = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    reference = Flux2Transformer2DModel(**bfl.transformer_config({k: tuple(v.shape) for k, v in state.items()}))
    reference.load_state_dict(bfl.to_diffusers(state))  # the file layout's converter, on ComfyUI's weights
    torch.manual_seed(3)
    lat, noise, sig = torch.randn(2, 128, 4, 4), torch.randn(2, 128, 4, 4), torch.tensor([0.3, 0.8])
    cond = T.families.conditioning.Conditioning(torch.randn(2, 7, TEXT))
    flow = T.loop.flow

    def grads(backend):
        lora = _lora(T, backend.dims)
        with backend.training(lora, T.loop.memory.MemoryConfig("blocks")):
            v = backend.velocity(flow.noisy_latents(lat, noise, sig), sig, cond)
            loss = flow.flow_matching_loss(v, flow.velocity_target(lat, noise)).mean()
            loss.backward()
        return loss.item(), [p.grad for p in lora.parameters()]

    ref_loss, ref_grads = grads(DiffusersFlux2(reference.eval()))
    loss, got = grads(host_backend)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for g, r in zip(got, ref_grads):
        assert r.abs().max() > 0 and (g - r).abs().max() <= 1e-4 * r.abs().max()


def test_layer_group_node_offers_the_modulation_group(flux2):
    """The LoRA Layer Group node's blocks input holds 'modulation'; its group targets the three
    shared modulation layers of ComfyUI's tiny FLUX.2, and FLUX.1 refuses it by name."""
    node = flux2.nodes.layers.LoraLayerGroup
    spec = node.execute("modulation", 0, 1, ", ".join(MODULATION), 2, 0.0).result[0]
    with torch.inference_mode():
        model = flux2.nodes.host.tiny.load_tiny_flux2(0)
    backend, _ = flux2.nodes.host.models.flux_backend(model)
    names = {t.name for t in spec.targets(backend.dims)}
    assert {n.split(".")[0] for n in names} == {"double_stream_modulation_img", "double_stream_modulation_txt",
                                                "single_stream_modulation"}
    flux1, _ = flux2.nodes.host.models.flux_backend(flux2.nodes.host.tiny.load_tiny_flux(0)[0])
    with pytest.raises(ValueError, match="no modulation"):
        spec.targets(flux1.dims)
