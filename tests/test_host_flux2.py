"""Host tests: FLUX.2 in a real ComfyUI (COMFYUI_PATH). A toy-width FLUX.2 built by ComfyUI's own
loader from FLUX.2 weights trains (the fixed-noise loss falls), every memory mode computes what
the plain path computes, and the saved LoRA, through the stock LoraLoader with every key
recognised, computes what training computed. A ComfyUI without FLUX.2 refuses it by name."""

import logging

import pytest
import torch
from comfyui_host import requires_host

pytestmark = requires_host
TEXT = 96  # the tiny FLUX.2's text width: its Qwen3 encoder's three layers of 32 (nodes/host/tiny.py)


@pytest.fixture
def flux2(host):
    import comfy.model_base

    if not hasattr(comfy.model_base, "Flux2"):
        pytest.skip("this ComfyUI has no FLUX.2")
    return host.pack


def _model(pack, guidance=False):
    import comfy.model_management

    with torch.inference_mode():  # as inside a node
        model = pack.nodes.host.tiny.load_tiny_flux2(0, guidance)
        comfy.model_management.load_models_gpu([model])
    return model


def _backend(pack, model):
    backend, _ = pack.nodes.host.models.flux_backend(model)
    return backend


def _cond(T, batch=1, tokens=7, guidance=1.0):
    return T.families.conditioning.Conditioning(torch.randn(batch, tokens, TEXT), None, guidance)


def test_comfyui_without_flux2_refuses_it_by_name(host):
    import comfy.model_base

    if hasattr(comfy.model_base, "Flux2"):
        pytest.skip("this ComfyUI has FLUX.2")
    with pytest.raises(ValueError, match=r"FLUX.2 needs ComfyUI ≥ 0\.3\.72.*this ComfyUI is 0\.3\.64"):
        host.pack.nodes.host.tiny.load_tiny_flux2(0)


def test_flux2_is_read_from_the_loaded_model(flux2):
    T = flux2.trainer
    klein, dev = _backend(flux2, _model(flux2)), _backend(flux2, _model(flux2, guidance=True))
    assert klein.family.name == "flux2" and (klein.variant, dev.variant) == ("klein", "dev")
    assert klein.dims == T.families.flux2.layers.Flux2Dims(256, 768, 2, 2)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", klein.dims, rank=4)
    linear1 = [t for t in spec.targets(klein.dims) if t.bfl_module == "single_blocks.0.linear1"]
    assert [t.rows for t in linear1] == [(0, 256), (256, 512), (512, 768), (768, 768 + 2 * 768)]  # q k v gate|up
    assert klein.dit.get_submodule(linear1[0].bfl_module).weight.shape == (3 * 256 + 2 * 768, 256)
    with pytest.raises(ValueError, match="pooled"):
        klein.velocity(torch.randn(1, 128, 4, 4), torch.tensor([0.5]),
                       T.families.conditioning.Conditioning(torch.randn(1, 7, TEXT), torch.randn(1, 64)))


def _grads(T, backend, spec, memory, batch):
    lat, noise, cond, sig = batch
    lora = T.lora.weights.LoraSet(spec.targets(backend.dims), seed=5)
    with torch.no_grad():
        for i, w in enumerate(lora):
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    with backend.training(lora, memory):
        v = backend.velocity(T.loop.flow.noisy_latents(lat, noise, sig), sig, cond)
        loss = T.loop.flow.flow_matching_loss(v, T.loop.flow.velocity_target(lat, noise)).mean()
        loss.backward()
    return loss.item(), [p.grad for p in lora.parameters()]


def test_flux2_memory_modes_match_the_plain_path(flux2):
    """FLUX.2's blocks take their modulation as tuples of ComfyUI's ModulationOut: checkpointed,
    offloaded and swapped blocks give the plain path's loss and LoRA gradients."""
    T = flux2.trainer
    backend = _backend(flux2, _model(flux2, guidance=True))
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    torch.manual_seed(3)
    batch = (torch.randn(2, 128, 4, 4), torch.randn(2, 128, 4, 4), _cond(T, 2, guidance=3.5), torch.tensor([0.3, 0.8]))
    M = T.loop.memory.MemoryConfig
    ref_loss, ref_grads = _grads(T, backend, spec, M("off"), batch)
    assert all(g.abs().max() > 0 for g in ref_grads)
    for memory in (M("blocks"), M("blocks", checkpoint_every=2), M("offload"), M("blocks", swap_blocks=2)):
        loss, grads = _grads(T, backend, spec, memory, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5), memory
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max(), memory


def test_tiny_flux2_trains_and_its_file_loads_with_every_key_in_the_stock_lora_loader(flux2, host, caplog):
    import comfy.lora
    import comfy.model_management
    from safetensors.torch import save_file

    T = flux2.trainer
    model = _model(flux2)
    backend = _backend(flux2, model)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    lora = T.lora.weights.LoraSet(spec.targets(backend.dims), seed=0)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(128, 1, 1, generator=g)  # latents with something in common to learn, as photos have
    examples = [T.data.encode.Example(shared + 0.3 * torch.randn(128, 4, 4, generator=g),
                                      torch.randn(7, TEXT, generator=g), None, f"photo {i}") for i in range(2)]
    config = T.loop.config.TrainConfig(steps=20, learning_rate=1e-2, seed=0)
    before = T.loop.trainer.fixed_noise_loss(backend, lora, examples, config.guidance)
    T.loop.trainer.train(backend, lora, examples, config)
    after = T.loop.trainer.fixed_noise_loss(backend, lora, examples, config.guidance)
    logging.getLogger(__name__).info("tiny FLUX.2 fixed-noise loss %.4f -> %.4f", before, after)
    assert after <= 0.8 * before, (before, after)

    sd = T.outputs.export.kohya_state_dict(lora)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len({k.split(".")[0] for k in sd}) == 2 * 8 + 2 * 2  # qkv, proj, mlp.0/2 ×2; linear1/2

    torch.manual_seed(4)
    args = (torch.randn(1, 128, 4, 4), torch.tensor([0.6]), _cond(T))
    with torch.no_grad():
        base = backend.velocity(*args)
        with backend.lora_applied(lora):
            trained = backend.velocity(*args)
    name = "flux2/tiny_flux2.safetensors"
    (host.root / "loras" / "flux2").mkdir(parents=True, exist_ok=True)
    meta = T.outputs.export.LoraMetadata(spec, "", "tiny", family="flux2", variant=backend.variant).header(20)
    save_file(sd, str(host.root / "loras" / name), metadata=meta)
    (patched,) = host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        from_file = _backend(flux2, patched).velocity(*args)
    change, error = (trained - base).abs().max(), (from_file - trained).abs().max()
    assert change > 1e-3 and error < 1e-3 * change, (change, error)
    assert meta["dreambooth.family"] == "flux2" and meta["modelspec.architecture"] == "flux-2-klein/lora"


def test_comfyui_and_diffusers_flux2_backends_agree(flux2):
    """The toy FLUX.2's weights mapped into diffusers' Flux2Transformer2DModel (ComfyUI's own
    flux_to_diffusers, plus the timestep and shared-modulation layers it leaves out) give the same
    loss and LoRA gradients as ComfyUI's model, also with checkpointing."""
    import comfy.utils
    from diffusers import Flux2Transformer2DModel

    T = flux2.trainer
    model = _model(flux2, guidance=True)
    sd = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    cfg = model.model.model_config.unet_config
    key_map = comfy.utils.flux_to_diffusers(cfg)
    key_map.update({f"time_guidance_embed.{d}.linear_{i + 1}.weight": f"{b}.{layer}.weight"
                    for d, b in (("timestep_embedder", "time_in"), ("guidance_embedder", "guidance_in"))
                    for i, layer in enumerate(("in_layer", "out_layer"))})
    key_map.update({f"{m}.linear.weight": f"{m}.lin.weight" for m in
                    ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")})
    reference = Flux2Transformer2DModel(num_layers=cfg["depth"], num_single_layers=cfg["depth_single_blocks"],
                                        attention_head_dim=128, num_attention_heads=cfg["num_heads"],
                                        joint_attention_dim=cfg["context_in_dim"], guidance_embeds=True)
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

    LayerGroup = T.lora.targets.LayerGroup
    spec = T.lora.targets.LayerSpec((
        LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "attn.to_v", "attn.to_out.0", "ff.linear_in",
                                                "attn.add_k_proj", "ff_context.linear_out"), 4, 2.0),
        LayerGroup("single_transformer_blocks", 0, 2, ("attn.to_k", "proj_mlp", "attn.to_out"), 3)))
    torch.manual_seed(3)
    batch = (torch.randn(2, 128, 4, 4), torch.randn(2, 128, 4, 4), _cond(T, 2, guidance=3.5), torch.tensor([0.3, 0.8]))
    M = T.loop.memory.MemoryConfig
    from importlib import import_module

    diffusers_backend = import_module(f"{flux2.__name__}.trainer.families.flux2.diffusers").DiffusersFlux2
    ref_loss, ref_grads = _grads(T, diffusers_backend(reference), spec, M("off"), batch)
    host = _backend(flux2, model)
    for memory in (M("off"), M("blocks")):
        loss, grads = _grads(T, host, spec, memory, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max()
