"""Host tests: DoRA, LoKr and LoHa LoRAs in a real ComfyUI (COMFYUI_PATH). Trained by the Train
node and saved, every key of the file is one ComfyUI's own loader recognises; and the stock
LoraLoader, given the file, computes what training computed on activations."""

import logging

import pytest
import torch
from comfyui_host import requires_host, train_prompt

pytestmark = requires_host

VARIANTS = ["dora", "lokr", "loha"]


def _modules(sd) -> set[str]:
    return {k.split(".")[0] for k in sd}


@pytest.mark.parametrize("variant, weight_dtype", [("dora", "default"), ("lokr", "default"), ("loha", "default"),
                                                   ("dora", "fp8_e4m3fn")])
def test_train_node_saves_a_file_whose_every_key_comfyui_loads(host, variant, weight_dtype, caplog):
    import comfy.lora
    import comfy.utils

    prompt = train_prompt(steps=4)
    prompt["1"]["inputs"]["weight_dtype"] = weight_dtype
    # single blocks' q/k/v/mlp are slices of ComfyUI's fused linear1; proj_out is a whole layer
    prompt["3"]["inputs"].update(layer_types="attention, proj_mlp", variant=variant)
    prompt["5"]["inputs"].update(filename_prefix=f"variants/{variant}_{weight_dtype}", precision="fp32")
    outputs = host.run(prompt)
    before, after = outputs["4"]["fixed_noise_loss"]
    assert after < before, (before, after)
    sd = comfy.utils.load_torch_file(str(host.root / "loras" / outputs["5"]["text"][0]))
    model, _, _ = host.pack.nodes.host.tiny.load_tiny_flux(0)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len(_modules(sd)) == 4 * 5  # 4 single blocks × q, k, v, proj_mlp, proj_out
    assert {type(p).__name__ for p in patches.values()} == {"dora": {"LoRAAdapter"}, "lokr": {"LoKrAdapter"},
                                                            "loha": {"LoHaAdapter"}}[variant]
    assert any(isinstance(k, tuple) for k in patches)  # the fused slices went through ComfyUI's offsets


def _groups(LayerGroup, variant):
    if variant == "mixed":  # each group its own variant settings (SimpleTuner's LyCORIS module_algo_map)
        return (LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "attn.add_v_proj", "attn.to_out.0", "ff.net.2"),
                           4, 2.0, "lokr", 2),
                LayerGroup("single_transformer_blocks", 0, 2, ("attn.to_k", "proj_mlp"), 4, None, "lokr", 4, True),
                LayerGroup("single_transformer_blocks", 2, 4, ("attn.to_k", "proj_out"), 2, None, "loha"),
                LayerGroup("single_transformer_blocks", 0, 4, ("attn.to_v",), 4, 8.0, "lora"))
    return (LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "attn.add_v_proj", "attn.to_out.0", "ff.net.2"), 4,
                       2.0, variant),
            LayerGroup("single_transformer_blocks", 0, 4, ("attn.to_k", "proj_mlp", "proj_out"), 4, None, variant))


@pytest.mark.parametrize("variant", [*VARIANTS, "mixed"])
def test_stock_lora_loader_computes_what_training_computed(host, variant, caplog):
    """A LoRA on ComfyUI's fused layers, hooked on activations as training runs it, against the
    same LoRA saved and merged into the weights by the stock LoraLoaderModelOnly ("mixed": LoKr
    groups with their own factors, a LoHa and a LoRA group in one file)."""
    import comfy.model_management
    from safetensors.torch import save_file

    pack, T = host.pack, host.pack.trainer
    with torch.inference_mode():  # as inside a node
        model, _, _ = pack.nodes.host.tiny.load_tiny_flux(0)
        comfy.model_management.load_models_gpu([model])
    backend = T.families.flux1.comfy.ComfyFlux(model.model, model.load_device)
    LayerGroup = T.lora.targets.LayerGroup
    spec = T.lora.targets.LayerSpec(_groups(LayerGroup, variant))
    lora = T.lora.weights.LoraSet(spec.targets(backend.dims), seed=5)
    torch.manual_seed(3)
    args = (torch.randn(1, 16, 8, 8), torch.tensor([0.6]),
            T.families.conditioning.Conditioning(torch.randn(1, 7, 64), torch.randn(1, 64), 3.5))
    with torch.no_grad():
        base = backend.velocity(*args)
        with backend.lora_applied(lora):  # DoRA measures the frozen rows on its first call
            backend.velocity(*args)
        g = torch.Generator().manual_seed(1)
        for p in lora.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.abs().mean().clamp_min(0.05))
        with backend.lora_applied(lora):
            trained = backend.velocity(*args)
    name = f"variants/stock_{variant}.safetensors"
    (host.root / "loras" / "variants").mkdir(parents=True, exist_ok=True)
    sd = T.outputs.export.kohya_state_dict(lora)
    save_file(sd, str(host.root / "loras" / name))
    import comfy.lora

    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert "lora key not loaded" not in caplog.text and len(patches) == len(_modules(sd))
    if variant == "mixed":
        assert {type(p).__name__ for p in patches.values()} == {"LoKrAdapter", "LoHaAdapter", "LoRAAdapter"}
        w1 = {k: tuple(v.shape) for k, v in sd.items() if k.endswith("lokr_w1")}  # each group's own factor
        assert {s for k, s in w1.items() if "_transformer_blocks_" in k and "single" not in k} == {(2, 2)}
        assert {s for k, s in w1.items() if "single_transformer_blocks" in k} == {(4, 4)}
    (patched,) = host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        from_file = T.families.flux1.comfy.ComfyFlux(patched.model, patched.load_device).velocity(*args)
    change, error = (trained - base).abs().max(), (from_file - trained).abs().max()
    logging.getLogger(__name__).info("%s: the LoRA changes the velocity by %.3g, the file differs by %.3g",
                                     variant, change, error)
    assert change > 1e-3 and error < 1e-3 * change, (change, error)
