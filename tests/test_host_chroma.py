"""Host tests: Chroma in a real ComfyUI (COMFYUI_PATH). A toy-width Chroma built by ComfyUI's own
loader from Chroma weights is read as the Chroma family, trains (the fixed-noise loss falls), gives
diffusers' ChromaTransformer2DModel's loss and LoRA gradients on the same weights, computes the plain
path's in every memory mode, and its saved LoRA, through the stock LoraLoader with every key
recognised, computes what training computed. Chroma Radiance is refused by name."""

import logging
from importlib import import_module

import pytest
import torch
from comfyui_host import requires_host

pytestmark = requires_host


def _model(pack):
    import comfy.model_management

    with torch.inference_mode():  # as inside a node
        model = pack.nodes.host.tiny.load_tiny_chroma(0)
        comfy.model_management.load_models_gpu([model])
    return model


@pytest.fixture(scope="module")
def chroma(host):
    return host.pack, _model(host.pack)


def _backend(pack, model):
    backend, _ = pack.nodes.host.models.flux_backend(model)
    return backend


def _cond(T, batch=1, tokens=7):
    return T.families.conditioning.Conditioning(torch.randn(batch, tokens, 64), None, 0.0)


def _batch(T):
    torch.manual_seed(3)
    return torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), _cond(T, 2), torch.tensor([0.3, 0.8])


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


def test_chroma_is_read_from_the_loaded_model(chroma):
    pack, model = chroma
    T = pack.trainer
    backend = _backend(pack, model)
    assert type(model.model).__name__ == "Chroma"
    assert backend.family.name == "chroma" and backend.variant == "" and not backend.family.pooled
    assert backend.dims == T.families.chroma.layers.ChromaDims(256, 1024, 2, 2)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    linear1 = [t for t in spec.targets(backend.dims) if t.bfl_module == "single_blocks.0.linear1"]
    assert [t.rows for t in linear1] == [(0, 256), (256, 512), (512, 768), (768, 768 + 1024)]  # q k v mlp
    with pytest.raises(ValueError, match="norm1.linear"):  # no per-block modulation layers to train
        T.lora.targets.LayerSpec((T.lora.targets.LayerGroup("transformer_blocks", 0, 2, ("norm1.linear",), 4),)
                                 ).targets(backend.dims)
    with pytest.raises(ValueError, match="pooled"):
        backend.velocity(torch.randn(1, 16, 8, 8), torch.tensor([0.5]),
                         T.families.conditioning.Conditioning(torch.randn(1, 7, 64), torch.randn(1, 64)))


def test_chroma_radiance_is_refused_by_name(host):
    import comfy.model_base

    class FakePatcher:  # a Chroma Radiance MODEL without building one (its NeRF head is large)
        model = comfy.model_base.ChromaRadiance.__new__(comfy.model_base.ChromaRadiance)

    with pytest.raises(ValueError, match="Chroma Radiance, which works in pixel space"):
        host.pack.nodes.host.models.flux_backend(FakePatcher())


def test_chroma_memory_modes_match_the_plain_path(chroma):
    """Chroma's blocks take their modulation as tuples of ComfyUI's ModulationOut: checkpointed,
    offloaded and swapped blocks give the plain path's loss and LoRA gradients."""
    pack, model = chroma
    T = pack.trainer
    backend = _backend(pack, model)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    batch = _batch(T)
    M = T.loop.memory.MemoryConfig
    ref_loss, ref_grads = _grads(T, backend, spec, M("off"), batch)
    assert all(g.abs().max() > 0 for g in ref_grads)
    for memory in (M("blocks"), M("blocks", checkpoint_every=2), M("offload"), M("blocks", swap_blocks=2)):
        loss, grads = _grads(T, backend, spec, memory, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5), memory
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max(), memory


def test_tiny_chroma_trains_and_its_file_loads_with_every_key_in_the_stock_lora_loader(chroma, host, caplog):
    import comfy.lora
    import comfy.model_management
    from safetensors.torch import save_file

    pack, model = chroma
    T = pack.trainer
    backend = _backend(pack, model)
    spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
    lora = T.lora.weights.LoraSet(spec.targets(backend.dims), seed=0)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, 1, 1, generator=g)  # latents with something in common to learn, as photos have
    examples = [T.data.encode.Example(shared + 0.3 * torch.randn(16, 8, 8, generator=g),
                                      torch.randn(7, 64, generator=g), None, f"photo {i}") for i in range(2)]
    config = T.loop.config.TrainConfig(steps=20, learning_rate=1e-2, seed=0,
                                       timesteps=T.loop.flow.TimestepSampling(backend.family.timestep_sampling))
    before = T.loop.trainer.fixed_noise_loss(backend, lora, examples, 0.0)
    T.loop.trainer.train(backend, lora, examples, config)
    after = T.loop.trainer.fixed_noise_loss(backend, lora, examples, 0.0)
    logging.getLogger(__name__).info("tiny Chroma fixed-noise loss %.4f -> %.4f", before, after)
    assert after <= 0.8 * before, (before, after)

    sd = T.outputs.export.kohya_state_dict(lora)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len({k.split(".")[0] for k in sd}) == 2 * 8 + 2 * 2  # qkv, proj, mlp.0/2 ×2; linear1/2

    torch.manual_seed(4)
    args = (torch.randn(1, 16, 8, 8), torch.tensor([0.6]), _cond(T))
    with torch.no_grad():
        base = backend.velocity(*args)
        with backend.lora_applied(lora):
            trained = backend.velocity(*args)
    name = "chroma/tiny_chroma.safetensors"
    (host.root / "loras" / "chroma").mkdir(parents=True, exist_ok=True)
    meta = T.outputs.export.LoraMetadata(spec, "", "tiny", family="chroma", variant=backend.variant).header(20)
    save_file(sd, str(host.root / "loras" / name), metadata=meta)
    (patched,) = host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        from_file = _backend(pack, patched).velocity(*args)
    change, error = (trained - base).abs().max(), (from_file - trained).abs().max()
    assert change > 1e-3 and error < 1e-3 * change, (change, error)
    assert meta["dreambooth.family"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"


def _as_diffusers(model):
    """The toy Chroma's weights in diffusers' ChromaTransformer2DModel: ComfyUI's own
    flux_to_diffusers for the blocks, plus the distilled guidance layer and the outer layers.
    ComfyUI computes the 344 modulation slots of Chroma1's 19 + 38 blocks whatever the depth and
    reads the final layer's from the last two; diffusers sizes them to the depth. At Chroma1's depth
    the two agree; at toy depth the reference gets ComfyUI's 344 slots."""
    import comfy.utils
    from diffusers import ChromaTransformer2DModel
    from diffusers.models.embeddings import get_timestep_embedding

    sd = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    cfg = model.model.model_config.unet_config
    key_map = dict(comfy.utils.flux_to_diffusers(cfg))
    approximator = "distilled_guidance_layer"
    for p in ("weight", "bias"):
        key_map.update({f"{approximator}.{m}.{p}": f"{approximator}.{m}.{p}" for m in ("in_proj", "out_proj")})
        key_map.update({f"{approximator}.layers.{i}.linear_{j + 1}.{p}": f"{approximator}.layers.{i}.{layer}.{p}"
                        for i in range(cfg["n_layers"]) for j, layer in enumerate(("in_layer", "out_layer"))})
        key_map.update({f"{m}.{p}": f"{b}.{p}" for m, b in (("x_embedder", "img_in"), ("context_embedder", "txt_in"),
                                                              ("proj_out", "final_layer.linear"))})
    for i in range(cfg["n_layers"]):  # RMSNorm scales: `.weight` in v0.33's ComfyUI, `.scale` in v0.3.64's
        norm = f"{approximator}.norms.{i}"
        key_map[f"{norm}.weight"] = f"{norm}.weight" if f"{norm}.weight" in sd else f"{norm}.scale"
    reference = ChromaTransformer2DModel(num_layers=cfg["depth"], num_single_layers=cfg["depth_single_blocks"],
                                         attention_head_dim=128, num_attention_heads=cfg["num_heads"],
                                         joint_attention_dim=cfg["context_in_dim"],
                                         approximator_hidden_dim=cfg["hidden_dim"], approximator_layers=cfg["n_layers"])
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
    reference.time_text_embed.mod_proj = get_timestep_embedding(torch.arange(344) * 1000, 32, flip_sin_to_cos=True,
                                                                downscale_freq_shift=0)
    return reference


def test_comfyui_and_diffusers_chroma_backends_agree(chroma):
    """The toy Chroma's weights in diffusers' ChromaTransformer2DModel give the same loss and LoRA
    gradients as ComfyUI's model, also with checkpointing."""
    pack, model = chroma
    T = pack.trainer
    reference = _as_diffusers(model)
    LayerGroup = T.lora.targets.LayerGroup
    spec = T.lora.targets.LayerSpec((
        LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "attn.to_v", "attn.to_out.0", "ff.net.0.proj",
                                                "attn.add_k_proj", "ff_context.net.2"), 4, 2.0),
        LayerGroup("single_transformer_blocks", 0, 2, ("attn.to_k", "proj_mlp", "proj_out"), 3)))
    batch = _batch(T)
    M = T.loop.memory.MemoryConfig
    diffusers_backend = import_module(f"{pack.__name__}.trainer.families.chroma.diffusers").DiffusersChroma
    ref_loss, ref_grads = _grads(T, diffusers_backend(reference), spec, M("off"), batch)
    host = _backend(pack, model)
    for memory in (M("off"), M("blocks")):
        loss, grads = _grads(T, host, spec, memory, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max()


def test_the_train_node_trains_chroma_and_saves_a_chroma_lora(host):
    """The Train node, run by ComfyUI's executor on a Chroma MODEL (the toy one, with the tiny FLUX's
    T5 and VAE: its CLIP-L pooled vector is left out, as Chroma reads none), encodes, renders with
    ComfyUI's sampler, trains and saves a LoRA that records the family."""
    from comfyui_host import train_prompt
    from safetensors import safe_open

    from_tiny = host.pack.nodes.host.tiny

    class TinyChromaForTests:
        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        CATEGORY = "tests"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            _, clip, vae = from_tiny.load_tiny_flux(0)
            return from_tiny.load_tiny_chroma(0), clip, vae

    host.nodes.NODE_CLASS_MAPPINGS["TinyChromaForTests"] = TinyChromaForTests
    try:
        prompt = train_prompt(steps=3, guidance=0.0)
        prompt["1"] = {"class_type": "TinyChromaForTests", "inputs": {}}
        prompt["3"]["inputs"]["end"] = 2  # the toy Chroma has 2 single blocks
        prompt["20"] = {"class_type": "FluxDreamBoothValidation", "inputs": {
            "prompts": "a photo of [trigger] toy", "seeds": "7", "guidance": "3.5", "sample_steps": "2", "width": 64,
            "height": 64, "every_n_steps": 3, "sampler_name": "euler", "scheduler": "simple",
            "before_training": False}}
        prompt["21"] = {"class_type": "FluxDreamBoothRun", "inputs": {
            "run_name": "tiny_chroma", "save_every_n_steps": 3, "keep_last": 0, "resume_from": "",
            "plot_every_n_steps": 2}}
        prompt["4"]["inputs"].update(validation=["20", 0], run=["21", 0])
        outputs = host.run(prompt)
    finally:
        del host.nodes.NODE_CLASS_MAPPINGS["TinyChromaForTests"]
    run = host.root / "output" / "flux_dreambooth" / "tiny_chroma_001"
    assert (run / "samples" / "step_000003_00.png").is_file() and (run / "checkpoints" / "step_000003").is_dir()
    with safe_open(str(host.root / "loras" / outputs["5"]["text"][0]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["dreambooth.family"], meta["modelspec.architecture"]) == ("chroma", "chroma/lora")
    assert meta["dreambooth.base_model"] == "tiny-chroma (random weights, seed 0)"
    assert {k.split(".")[0] for k in keys} == {f"lora_unet_single_blocks_{i}_{m}" for i in (0, 1)
                                               for m in ("linear1", "linear2")}


def test_chroma_renders_with_its_guidance_input_at_0(chroma, host):
    """Validation's FLUX guidance does not reach Chroma's distilled guidance input: it stays at 0, as
    in Chroma's training and its ComfyUI workflows (a FluxGuidance value there changes the image)."""
    import node_helpers

    pack, model = chroma
    sampling = pack.nodes.host.sampling
    _, clip, vae = pack.nodes.host.tiny.load_tiny_flux(0)
    cond = sampling.encode_prompt(clip, "a photo of sks toy")
    with torch.inference_mode():
        at_35, at_0 = (sampling.render(model, vae, cond, 7, 2, g, "euler", "simple", 64, 64) for g in (3.5, 0.0))
        with_guidance = node_helpers.conditioning_set_values(cond, {"guidance": 3.5})
        stock = sampling.render(model, vae, with_guidance, 7, 2, 0.0, "euler", "simple", 64, 64)
    assert torch.equal(at_35, at_0) and (stock - at_0).abs().max() > 1e-3
