"""Host tests: the pack inside a real ComfyUI (COMFYUI_PATH), run by ComfyUI's own executor."""

import importlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_host import PACK_DIR, by_type, requires_host, train_prompt, ui_to_api
from PIL import Image

from trainer.families.flux2 import MIN_COMFYUI_KLEIN

pytestmark = requires_host

QUICKSTART = PACK_DIR / "example_workflows" / "flux_dreambooth_quickstart.json"  # FLUX.2's: test_host_flux2_quickstart
NODES = sorted(["FluxDreamBoothTinyFlux", "FluxDreamBoothDatasetFolder", "FluxDreamBoothDatasetMflux",
                "FluxDreamBoothDatasetImages", "FluxDreamBoothAugment", "FluxDreamBoothRegularisation",
                "FluxDreamBoothClassImages", "FluxDreamBoothCaption", "FluxDreamBoothDatasetReport",
                "FluxDreamBoothLayers", "FluxDreamBoothValidation", "FluxDreamBoothRun", "FluxDreamBoothTrain",
                "FluxDreamBoothTrainingSettings", "FluxDreamBoothImportConfig",
                "FluxDreamBoothLoadCheckpoint", "FluxDreamBoothApply", "FluxDreamBoothSave"])


def pixels(host, ui) -> np.ndarray:
    return np.asarray(Image.open(host.output_file(ui)), dtype=np.float32)


def loras(host) -> set[str]:
    return {p.relative_to(host.root / "loras").as_posix() for p in (host.root / "loras").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def quickstart(host):
    """The shipped quickstart workflow, run once, with a second Save node writing fp32."""
    prompt = ui_to_api(json.loads(QUICKSTART.read_text()), host.nodes.NODE_CLASS_MAPPINGS)
    (train,) = by_type(prompt, "FluxDreamBoothTrain")
    (save,) = by_type(prompt, "FluxDreamBoothSave")
    prompt["900"] = {"class_type": "FluxDreamBoothSave", "inputs": {**prompt[save]["inputs"], "precision": "fp32",
                                                                     "filename_prefix": "flux_dreambooth/exact"}}
    started = time.perf_counter()
    outputs = host.run(prompt)
    return prompt, outputs, time.perf_counter() - started


def test_pack_loads_as_a_v3_extension_with_its_web_folder(host):
    assert host.pack_nodes == NODES
    assert not hasattr(host.pack, "NODE_CLASS_MAPPINGS")  # V3 only: V1 would silently win
    assert Path(host.nodes.EXTENSION_WEB_DIRS[host.pack.__name__.split("/")[-1]]) == PACK_DIR / "web" / "js"


def test_quickstart_trains_saves_and_changes_the_sample(host, quickstart):
    prompt, outputs, seconds = quickstart
    (train,) = by_type(prompt, "FluxDreamBoothTrain")
    before, after = outputs[train]["fixed_noise_loss"]
    assert after < 0.8 * before, (before, after)
    saved = outputs[by_type(prompt, "FluxDreamBoothSave")[0]]["text"][0]
    assert saved.startswith("flux_dreambooth/quickstart_") and saved in loras(host)
    without, with_lora = (pixels(host, outputs[k]) for k in by_type(prompt, "SaveImage"))
    assert np.abs(without - with_lora).mean() > 2.0
    logging.getLogger(__name__).info("quickstart ran in %.1f s on ComfyUI %s", seconds, host.version)


@pytest.mark.parametrize("workflow", sorted((PACK_DIR / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_example_workflows_are_valid_prompts_for_this_comfyui(host, workflow):
    """Every shipped workflow converts and passes ComfyUI's own validation (model files it names
    are stood in for by empty files, the image it loads by a small PNG: validation checks names, it
    loads nothing). One on FLUX.2's stock nodes needs a ComfyUI that has them."""
    import asyncio

    ui = json.loads(workflow.read_text())
    if any(n["type"] == "EmptyFlux2LatentImage" for n in ui["nodes"]) and \
            "EmptyFlux2LatentImage" not in host.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip(f"needs a newer ComfyUI, with FLUX.2 [klein] (≥ {MIN_COMFYUI_KLEIN}): ComfyUI {host.version} "
                    "has no EmptyFlux2LatentImage and no CLIPLoader type flux2")
    prompt = ui_to_api(ui, host.nodes.NODE_CLASS_MAPPINGS)
    stand_ins = {"UNETLoader": {"unet_name": "diffusion_models"}, "VAELoader": {"vae_name": "vae"},
                 "CLIPLoader": {"clip_name": "text_encoders"},
                 "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"}}
    for node in prompt.values():
        for field, folder in stand_ins.get(node["class_type"], {}).items():
            path = host.root / "models" / folder / node["inputs"][field]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            host.folder_paths.add_model_folder_path(folder, str(path.parent))
        if node["class_type"] == "LoadImage":
            Image.new("RGB", (64, 64), "gray").save(Path(host.folder_paths.get_input_directory()) /
                                                    node["inputs"]["image"])
    valid = asyncio.run(host.execution.validate_prompt("check", prompt, None))
    assert valid[0] and valid[3] == {}, valid[1:]  # True with node errors: only some outputs would run
    assert {n["class_type"] for n in prompt.values()} >= {"FluxDreamBoothTrain", "FluxDreamBoothSave", "KSampler"}


def test_comfyui_loader_accepts_every_key_of_the_saved_file(host, quickstart, caplog):
    import comfy.lora
    import comfy.utils

    model, _, _ = host.pack.nodes.host.tiny.load_tiny_flux(0)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    # the FLUX.1 quickstart's files: FLUX.2's are checked against FLUX.2 in test_host_flux2*.py
    for name in (n for n in loras(host) if n.startswith(("flux_dreambooth/quickstart_", "flux_dreambooth/exact"))):
        sd = comfy.utils.load_torch_file(str(host.root / "loras" / name))
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(sd, key_map)
        assert "lora key not loaded" not in caplog.text
        assert len(patches) == sum(k.endswith(".lora_down.weight") for k in sd) > 0


@pytest.mark.parametrize("prefix, exact, apply_with", [
    ("flux_dreambooth/exact", True, "LoraLoaderModelOnly"),
    ("flux_dreambooth/quickstart", False, "LoraLoaderModelOnly"),
    ("flux_dreambooth/exact", True, "FluxDreamBoothApply")])
def test_a_saved_lora_reloaded_gives_the_in_memory_sample(host, quickstart, prefix, exact, apply_with):
    """The file, through ComfyUI's stock LoraLoader (or our Apply node), renders what the Train
    node's MODEL rendered."""
    prompt, outputs, _ = quickstart
    name = next(n for n in loras(host) if n.startswith(prefix))
    sampler = by_type(prompt, "KSampler")[1]  # the one fed by the Train node's MODEL
    (loader,) = by_type(prompt, "FluxDreamBoothTinyFlux")
    replay = {k: json.loads(json.dumps(v)) for k, v in prompt.items()
              if v["class_type"] in ("FluxDreamBoothTinyFlux", "CLIPTextEncode", "EmptySD3LatentImage")}
    inputs = ({"lora_name": name, "strength_model": 1.0} if apply_with == "LoraLoaderModelOnly"
              else {"lora_name": name, "strength": 1.0})
    replay["50"] = {"class_type": apply_with, "inputs": {"model": [loader, 0], **inputs}}
    replay["51"] = {"class_type": "KSampler", "inputs": {**prompt[sampler]["inputs"], "model": ["50", 0]}}
    replay["52"] = {"class_type": "VAEDecode", "inputs": {"samples": ["51", 0], "vae": [loader, 2]}}
    replay["53"] = {"class_type": "SaveImage", "inputs": {"images": ["52", 0], "filename_prefix": "replay"}}
    from_file = pixels(host, host.run(replay)["53"])
    without, in_memory = (pixels(host, outputs[k]) for k in by_type(prompt, "SaveImage"))
    if exact:
        assert np.array_equal(from_file, in_memory)
    else:  # fp16 file: rounding only, a tiny fraction of what the LoRA changes
        assert np.abs(from_file - in_memory).mean() < 0.02 * np.abs(without - in_memory).mean()


def _loss_and_lora_grads(T, backend, spec, memory, batch, guidance):
    """One forward and backward with a LoRA whose ups are seeded non-zero: (loss, LoRA grads)."""
    lat, noise, ctx, pooled, sig = batch
    lora = T.lora.weights.LoraSet(spec.targets(backend.dims), seed=5)
    with torch.no_grad():
        for i, w in enumerate(lora):
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    with backend.training(lora, memory):
        v = backend.velocity(T.loop.flow.noisy_latents(lat, noise, sig), sig,
                             T.families.conditioning.Conditioning(ctx, pooled, guidance))
        loss = T.loop.flow.flow_matching_loss(v, T.loop.flow.velocity_target(lat, noise)).mean()
        loss.backward()
    return loss.item(), [p.grad for p in lora.parameters()]


def test_comfyui_and_diffusers_backends_agree(host):
    """Same weights (mapped with ComfyUI's own flux_to_diffusers) give the same loss and LoRA
    gradients, in every memory mode (checkpointing off, every block, every 2nd, offloaded, blocks
    swapped in from the CPU)."""
    import comfy.model_management
    import comfy.utils
    from diffusers import FluxTransformer2DModel

    pack = host.pack
    with torch.inference_mode():  # as inside a node
        model, _, _ = pack.nodes.host.tiny.load_tiny_flux(0)
        comfy.model_management.load_models_gpu([model])
    dit = model.model.diffusion_model
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
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

    T = pack.trainer
    spec = T.lora.targets.LayerSpec((
        T.lora.targets.LayerGroup("transformer_blocks", 0, 2, ("attn.to_q", "attn.to_v", "attn.to_out.0", "ff.net.2",
                                                         "norm1_context.linear", "attn.add_k_proj"), 4, 2.0),
        T.lora.targets.LayerGroup("single_transformer_blocks", 1, 4, ("attn.to_k", "proj_mlp", "proj_out"), 3)))
    torch.manual_seed(3)
    lat, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    ctx, pooled, sig = torch.randn(2, 7, 64), torch.randn(2, 64), torch.tensor([0.3, 0.8])

    def step(backend, memory):
        return _loss_and_lora_grads(T, backend, spec, memory, (lat, noise, ctx, pooled, sig), guidance=3.5)

    M = T.loop.memory.MemoryConfig
    ref_loss, ref_grads = step(T.families.flux1.diffusers.DiffusersFlux(reference), M("off"))
    training_kernels = pack.nodes.host.models.set_training_kernels
    host_backend = T.families.flux1.comfy.ComfyFlux(model.model, model.load_device, training_kernels)
    for memory in (M("off"), M("blocks"), M("blocks", checkpoint_every=2), M("offload"), M("blocks", swap_blocks=3),
                   M("offload", swap_blocks=5)):
        loss, grads = step(host_backend, memory)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max()


def test_fp8_weights_train_within_the_documented_tolerance_of_bf16(host):
    """The fp8 base (ComfyUI's fp8_e4m3fn weights) against bf16 weights of the same model: the
    loss within 5% and LoRA gradients pointing the same way (cosine ≥ 0.95), the README's
    tolerance; and on fp8 every memory mode gives the fp8 result."""
    import comfy.model_management

    T, pack = host.pack.trainer, host.pack
    M = T.loop.memory.MemoryConfig
    torch.manual_seed(3)
    lat, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    ctx, pooled, sig = torch.randn(1, 7, 64), torch.randn(1, 64), torch.tensor([0.6])

    def step(weight_dtype, memory):
        with torch.inference_mode():
            model, _, _ = pack.nodes.host.tiny.load_tiny_flux(0, weight_dtype)
            comfy.model_management.load_models_gpu([model])
        training_kernels = pack.nodes.host.models.set_training_kernels
        backend = T.families.flux1.comfy.ComfyFlux(model.model, model.load_device, training_kernels)
        spec = T.lora.targets.LayerSpec.preset("attention+mlp", backend.dims, rank=4)
        loss, grads = _loss_and_lora_grads(T, backend, spec, memory, (lat, noise, ctx, pooled, sig), guidance=1.0)
        return loss, torch.cat([g.flatten() for g in grads])

    bf16_loss, bf16_grads = step("bf16", M("off"))
    fp8_loss, fp8_grads = step("fp8_e4m3fn", M("off"))
    assert fp8_loss == pytest.approx(bf16_loss, rel=0.05)
    assert torch.nn.functional.cosine_similarity(fp8_grads, bf16_grads, dim=0) >= 0.95
    for memory in (M("blocks"), M("offload", swap_blocks=4)):
        loss, grads = step("fp8_e4m3fn", memory)
        assert loss == pytest.approx(fp8_loss, rel=1e-3)
        assert torch.allclose(grads, fp8_grads, rtol=1e-2, atol=1e-3 * fp8_grads.abs().max())


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16", "fp8_e4m3fn"])
def test_trains_on_bf16_fp16_and_fp8_weights(host, weight_dtype):
    prompt = train_prompt(steps=6)
    prompt["1"]["inputs"]["weight_dtype"] = weight_dtype
    outputs = host.run(prompt)
    before, after = outputs["4"]["fixed_noise_loss"]
    assert np.isfinite([before, after]).all() and after < before


@pytest.mark.parametrize("change, message", [
    (lambda p: p["2"]["inputs"].update(resolution="512"), "01.jpg is 176×160: its shorter side is under half the "
                                                          "resolution 512"),  # at 256 it trains at a smaller bucket
    (lambda p: p["3"]["inputs"].update(layer_types="proj_out, attn.to_add_out"), "'attn.to_add_out'"),
    (lambda p: p["3"]["inputs"].update(end=9), "ends at 9, but this model has 4 single_transformer_blocks"),
    (lambda p: p["2"]["inputs"].update(folder="no/such/folder"), "does not exist"),
    (lambda p: p["5"]["inputs"].update(filename_prefix="../../escape"), "leaves the loras folder"),
    (lambda p: p["5"]["inputs"].update(filename_prefix="."), "has no name part"),
])
def test_bad_input_is_named_and_writes_nothing(host, change, message):
    prompt = train_prompt()
    change(prompt)
    existing = loras(host)
    with pytest.raises(RuntimeError) as e:
        host.run(prompt)
    assert message in str(e.value)
    assert loras(host) == existing


SETTINGS = {"optimizer": "prodigy", "optimizer_args": "d_coef=2", "gradient_accumulation_steps": 2,
            "max_grad_norm": 1.0, "lr_num_cycles": 1, "lr_power": 1.0, "lr_end": 4e-7, "shift": 3.0,
            "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "loss": "pseudo_huber", "huber_c": 0.1,
            "loss_weighting": "cosmap"}


def test_training_settings_plug_into_train(host):
    prompt = train_prompt(learning_rate=1.0, timestep_sampling="sigmoid", lr_schedule="cosine", settings=["6", 0])
    prompt["6"] = {"class_type": "FluxDreamBoothTrainingSettings", "inputs": dict(SETTINGS)}
    prompt["5"]["inputs"]["filename_prefix"] = "checks/settings"
    outputs = host.run(prompt)
    before, after = outputs["4"]["fixed_noise_loss"]
    assert after < before, (before, after)
    from safetensors import safe_open

    with safe_open(str(host.root / "loras" / outputs["5"]["text"][0]), "pt") as f:
        meta = f.metadata()
    assert meta["dreambooth.optimizer"] == "prodigy" and meta["dreambooth.lr_schedule"] == "cosine"


def test_dop_trains_through_training_settings_on_comfyuis_flux(host):
    """Differential output preservation on ComfyUI's FLUX (fused q/k/v, in-place residual stream,
    checkpointing): the LoRA switched off for the frozen target, its term reported apart."""
    prompt = train_prompt(settings=["6", 0])
    prompt["6"] = {"class_type": "FluxDreamBoothTrainingSettings",
                   "inputs": {**SETTINGS, "optimizer": "adamw", "optimizer_args": "", "gradient_accumulation_steps": 1,
                              "shift": 1.0, "loss": "mse", "loss_weighting": "none", "dop_multiplier": 1.0,
                              "dop_class": ""}}
    prompt["5"]["inputs"]["filename_prefix"] = "checks/dop"
    outputs = host.run(prompt)
    before, after = outputs["4"]["fixed_noise_loss"]
    assert after < before, (before, after)
    progress = [d for e, d in host.server.events if e == "flux_dreambooth.progress"]
    assert progress and all(d["preservation_loss"] is not None for d in progress)
    assert progress[-1]["step"] == 4 and progress[-1]["preservation_loss"] > 0  # the LoRA moved the class caption


@pytest.mark.parametrize("change, message", [
    ({"optimizer_args": "no_such_arg=1"}, "optimizer_args has 'no_such_arg', which Prodigy does not take"),
    ({"optimizer": "adamw_schedulefree"}, "set lr_schedule to constant"),
    ({"dop_multiplier": 1.0, "dop_class": "[trigger]"}, "dop_class is '[trigger]'; give the class word itself"),
])
def test_bad_training_settings_are_named_and_write_nothing(host, change, message):
    prompt = train_prompt(lr_schedule="cosine", timestep_sampling="sigmoid", settings=["6", 0])
    prompt["6"] = {"class_type": "FluxDreamBoothTrainingSettings", "inputs": {**SETTINGS, **change}}
    existing = loras(host)
    with pytest.raises(RuntimeError) as e:
        host.run(prompt)
    assert message in str(e.value)
    assert loras(host) == existing


def test_metadata_names_the_file_comfyui_loaded_and_the_family(host, quickstart):
    """The base model is the file the MODEL came from, traced up the workflow through LoRA loaders
    and patches (a model made in memory, like the tiny FLUX, keeps its own name); the architecture
    is read from the weights."""
    loaded_from = host.pack.nodes.host.models.loaded_from
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-krea-dev.safetensors"}},
              "2": {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["1", 0], "lora_name": "style.safetensors"}},
              "3": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["2", 0], "max_shift": 1.15}},
              "4": {"class_type": "FluxDreamBoothTrain", "inputs": {"model": ["3", 0]}},
              "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-schnell-fp8.safetensors"}},
              "6": {"class_type": "FluxDreamBoothTrain", "inputs": {"model": ["5", 0]}},
              "7": {"class_type": "FluxDreamBoothTrain", "inputs": {"model": ["8", 0]}},
              "8": {"class_type": "FluxDreamBoothTinyFlux", "inputs": {"seed": 0}}}
    assert loaded_from(prompt, "4") == ("flux1-krea-dev.safetensors", ["style.safetensors"])
    assert loaded_from(prompt, 6) == ("flux1-schnell-fp8.safetensors", [])
    assert loaded_from(prompt, "7") == ("", []) and loaded_from(None, "4") == ("", [])
    name = next(n for n in loras(host) if n.startswith("flux_dreambooth/exact"))
    meta = host.pack.trainer.outputs.export.read_metadata(host.root / "loras" / name)
    assert meta["dreambooth.base_model"] == meta["ss_sd_model_name"] == "tiny-flux (random weights, seed 0)"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["dreambooth.family"] == "flux1"


def test_the_run_folder_holds_the_workflows_recipe_which_reads_back_and_trains(host, quickstart, tmp_path):
    """recipe.yaml in the quickstart's run folder is the workflow's training as our format: read back,
    it gives the nodes' settings, and the command line trains it; recipe_ai_toolkit.yaml is the job."""
    prompt, outputs, _ = quickstart
    T = host.pack.trainer
    (train,) = by_type(prompt, "FluxDreamBoothTrain")
    name = re.search(r"run (\S+);", outputs[train]["text"][0]).group(1)
    run = host.root / "output" / "flux_dreambooth" / name
    back = T.recipe.formats.load(run / "recipe.yaml")
    assert back.format == "ours" and back.unsupported == []
    r, node = back.recipe, lambda kind: prompt[by_type(prompt, kind)[0]]["inputs"]
    widgets, data, plan, runs = (node(k) for k in ("FluxDreamBoothTrain", "FluxDreamBoothDatasetFolder",
                                                   "FluxDreamBoothValidation", "FluxDreamBoothRun"))
    assert (r.train.steps, r.train.learning_rate, r.train.seed, r.train.guidance, r.train.lr_schedule) == \
        (widgets["steps"], widgets["learning_rate"], widgets["seed"], widgets["guidance"], widgets["lr_schedule"])
    assert Path(r.dataset.folders[0]).samefile(PACK_DIR / "trainer" / "assets" / "quickstart")
    assert (r.dataset.trigger, r.dataset.class_word, r.dataset.resolution) == \
        (data["trigger_word"], data["class_word"], [int(data["resolution"])])
    assert [(g.blocks, g.rank, len(g.layer_types)) for g in r.layers.groups] == \
        [("transformer_blocks", 8, 8), ("single_transformer_blocks", 8, 5)]  # the two LoRA Layer Group nodes
    assert (r.validation.prompts, r.validation.seed, r.validation.steps, r.validation.size) == \
        (plan["prompts"].splitlines(), 1, 8, 128)
    assert (r.save.name, r.save.every, r.save.keep_last) == (runs["run_name"], runs["save_every_n_steps"],
                                                             runs["keep_last"])
    assert (r.save.dtype, r.save.format) == ("fp16", "kohya")  # the Save FLUX LoRA node's
    written = (run / "recipe.yaml").read_text()
    assert "model: tiny-flux" in written and "no Save FLUX LoRA node" not in written  # what it can't hold, named
    assert "--model FILE (or --model tiny, the embedded tiny one)" in written  # how the command line runs it
    job = T.recipe.formats.load(run / "recipe_ai_toolkit.yaml")
    assert job.format == "ai-toolkit" and job.recipe.train.steps == widgets["steps"]
    cli = importlib.import_module(f"{T.__name__}.cli")
    assert cli.main(["train", "--config", str(run / "recipe.yaml"), "--model", "tiny", "--set", "steps=2",
                       "--set", "validation.prompts=[]", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{runs['run_name']}_001.safetensors").is_file()
