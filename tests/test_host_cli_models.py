"""`train --model` through ComfyUI's own loaders (COMFYUI_PATH set): ComfyUI's tiny FLUX written to
disk as a ComfyUI user has FLUX.1 (BFL transformer, bf16 and fp8; clip_l and t5xxl; ae.safetensors),
loaded back by the command line's ComfyUI loader, gives the in-memory model's loss; and the BFL
layout the diffusers loader reads is ComfyUI's own."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from comfyui_host import requires_host
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli_models import QUICKSTART, RECIPE, loss_of

from trainer import cli
from trainer.cli import comfy_models, diffusers_models, models, weights
from trainer.families.flux1 import bfl, tiny

pytestmark = requires_host


@pytest.fixture(scope="module")
def comfy_tiny(host):
    return host.pack.nodes.host.tiny.load_tiny_flux(0)


@pytest.fixture(scope="module")
def models_dir(comfy_tiny, tmp_path_factory):
    """ComfyUI's tiny FLUX as files, each from the ComfyUI object's own state dict."""
    model, clip, vae = comfy_tiny
    root = tmp_path_factory.mktemp("comfy_models")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir()
    dit = model.model.diffusion_model.state_dict()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        save_file({k: v.to(dtype).contiguous() for k, v in dit.items()},
                  str(root / "diffusion_models" / f"flux1-tiny-{name}.safetensors"))
    te = clip.cond_stage_model
    save_file({k: v.contiguous() for k, v in te.clip_l.transformer.state_dict().items()},
              str(root / "text_encoders" / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in te.t5xxl.transformer.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(root / "text_encoders" / "t5xxl_fp16.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.first_stage_model.state_dict().items()},
              str(root / "vae" / "ae.safetensors"))
    return root


def load_through_comfyui(host, root, name):
    args = argparse.Namespace(model=name, models_dir=root, clip_l=None, t5=None, vae=None, tokenizers=None,
                              loader="comfyui", dtype="auto")
    plan = models.plan(args)
    assert plan.loader == "comfyui" and plan.parts["vae"].path == root / "vae" / "ae.safetensors"
    tiny_host = host.pack.nodes.host.tiny
    with tiny_host._widths_from_weights():  # ComfyUI up to v0.3.x assumes FLUX.1's full widths
        # ComfyUI replaces clip_l's sizes by its long-CLIP check's, which start from "model_config"
        sizes = tiny_host.TEXT_ENCODER_SIZES
        return comfy_models.load(plan, clip_options={**sizes, "model_config": dict(sizes["clip_l_model_config"])},
                                 vae_config=tiny_host.VAE_CONFIG)


def test_comfyui_loader_gives_the_in_memory_models_loss(host, comfy_tiny, models_dir):
    in_memory = loss_of(comfy_models.ComfyModel(*comfy_tiny, "tiny", comfy_models.import_comfy()))
    loaded = load_through_comfyui(host, models_dir, "flux1-tiny-fp32.safetensors")
    assert loss_of(loaded) == pytest.approx(in_memory, rel=1e-6)
    fp8 = load_through_comfyui(host, models_dir, "flux1-tiny-fp8_e4m3fn.safetensors")
    weight = fp8.patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight  # ComfyUI's dtype for the device
    assert torch.equal(weight.to(torch.float8_e4m3fn).to(weight.dtype), weight)  # the fp8 file's values
    assert loss_of(fp8) == pytest.approx(in_memory, rel=0.02) and loss_of(fp8) != loss_of(loaded)


def test_the_bfl_layout_both_loaders_read_is_comfyuis(comfy_tiny, models_dir):
    """ComfyUI converted the diffusers-layout tiny transformer to BFL when it loaded it; bfl.py's table
    gives the same keys and tensors, and reads ComfyUI's file back into diffusers' model exactly."""
    model, _, _ = comfy_tiny
    comfy_state = bfl.canonical(model.model.diffusion_model.state_dict())
    ours = bfl.to_bfl(tiny.build(0).transformer.state_dict())
    assert set(ours) == set(comfy_state)
    assert all(torch.equal(ours[k], comfy_state[k].float()) for k in ours)
    w = weights.inspect(models_dir / "diffusion_models" / "flux1-tiny-fp32.safetensors", "--model", weights.TRANSFORMER)
    loaded = diffusers_models.transformer(w, torch.float32).state_dict()
    reference = tiny.build(0).transformer.state_dict()
    assert set(loaded) == set(reference) and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_train_on_files_through_comfyuis_loaders_end_to_end(host, models_dir, tmp_path, monkeypatch):
    """`python -m trainer train --loader comfyui` on the files: trains, renders a validation sample
    through the loaded VAE, and names the file in the LoRA."""
    tiny_host = host.pack.nodes.host.tiny
    sizes = tiny_host.TEXT_ENCODER_SIZES
    real_load = comfy_models.load
    monkeypatch.setattr(comfy_models, "load", lambda plan: real_load(  # the toy widths, as in load_through_comfyui
        plan, clip_options={**sizes, "model_config": dict(sizes["clip_l_model_config"])},
        vae_config=tiny_host.VAE_CONFIG))
    (tmp_path / "photos").mkdir()
    for name in ("01.jpg", "01.txt", "03.png", "03.txt"):
        shutil.copy(QUICKSTART / name, tmp_path / "photos")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    with tiny_host._widths_from_weights():
        code = cli.main(["train", "--config", str(tmp_path / "recipe.yaml"), "--models-dir", str(models_dir),
                         "--model", "flux1-tiny-bf16.safetensors", "--loader", "comfyui",
                         "--set", 'validation.prompts=["a photo of [trigger]"]', "--set", "validation.every=2",
                         "--set", "validation.steps=2", "--set", "validation.before_training=false"])
    assert code == 0
    run = tmp_path / "runs" / "toy_001"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and all(math.isfinite(v) for v in summary["losses"])
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000002_00.png"]
    with safe_open(str(tmp_path / "runs" / "toy_001.safetensors"), "pt") as f:
        assert f.metadata()["ss_sd_model_name"] == "flux1-tiny-bf16.safetensors"


def test_the_diffusers_loader_with_real_tokenizers_embeds_as_comfyui_does(host, models_dir, tmp_path):
    """ComfyUI's CLIP-L file loaded without ComfyUI, with --tokenizers pointing at CLIP-L's and T5's
    real tokenizers (the copies ComfyUI ships): the same token ids, and CLIP-L's pooled vector as
    ComfyUI's own CLIP gives it. (Its heads 64 wide, as CLIP-L's: the width a clip_l file's loader assumes.)"""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    sizes = host.pack.nodes.host.tiny.TEXT_ENCODER_SIZES
    options = {**sizes, "clip_l_model_config": {**sizes["clip_l_model_config"], "num_attention_heads": 1}}
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                                       comfy.text_encoders.flux.FluxClipModel),
                         model_options=options)
    shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    clip.load_sd(tiny.seeded_weights(shapes, 1), full_model=True)
    save_file({k: v.contiguous() for k, v in clip.cond_stage_model.clip_l.transformer.state_dict().items()},
              str(tmp_path / "clip_l_64_wide_heads.safetensors"))
    comfy_dir = Path(os.environ["COMFYUI_PATH"]) / "comfy"
    shutil.copytree(comfy_dir / "sd1_tokenizer", tmp_path / "tokenizers" / "tokenizer")
    shutil.copytree(comfy_dir / "text_encoders" / "t5_tokenizer", tmp_path / "tokenizers" / "tokenizer_2")
    args = argparse.Namespace(model="flux1-tiny-fp32.safetensors", models_dir=models_dir,
                              clip_l=str(tmp_path / "clip_l_64_wide_heads.safetensors"), t5=None, vae=None,
                              tokenizers=tmp_path / "tokenizers", loader="diffusers", dtype="fp32")
    loaded = models.load(models.plan(args))
    caption = "a photo of sks toy on a wooden table"
    tokens = clip.tokenize(caption)
    comfy_ids = {k: [t[0] for t in v[0]] for k, v in tokens.items()}
    assert loaded.clip_tokens(caption).tolist() == comfy_ids["l"][:77]
    t5_ids = loaded.t5_tokens(caption).tolist()
    real = comfy_ids["t5xxl"][:comfy_ids["t5xxl"].index(1) + 1]  # up to T5's </s>
    assert t5_ids[:len(real)] == real and set(t5_ids[len(real):]) == {0}
    _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert torch.allclose(loaded.encode_text(caption)[1], pooled[0].float(), atol=1e-5)
