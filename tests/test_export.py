import json
import os

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from trainer import files
from trainer.families.conditioning import Conditioning
from trainer.families.flux1.diffusers import DiffusersFlux
from trainer.families.flux1.layers import DOUBLE, SINGLE, FluxDims
from trainer.lora.targets import LayerGroup, LayerSpec
from trainer.lora.weights import LoraSet
from trainer.outputs import export

MIXED = LayerSpec((
    LayerGroup(DOUBLE, 0, 1, ("attn.to_q", "attn.to_v", "attn.add_k_proj", "attn.to_out.0", "ff.net.2",
                              "norm1_context.linear"), 4, 2.0),
    LayerGroup(SINGLE, 0, 1, ("attn.to_k", "proj_out", "norm.linear"), 3),
    LayerGroup(SINGLE, 0, 1, ("proj_mlp",), 6, 3.0),  # another rank and alpha in the same fused layer
))


def trained_like(spec, dims, seed=5, scale=0.1):
    lora = LoraSet(spec.targets(dims), seed=seed)
    with torch.no_grad():
        for i, w in enumerate(lora):
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(i)) * scale)
    return lora


def test_kohya_fused_layer_has_zero_rows_where_nothing_was_trained():
    dims = FluxDims(32, 128, 1, 1)
    sd = export.kohya_state_dict(trained_like(MIXED, dims))
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]  # to_q and to_v, not to_k
    assert up.shape == (96, 8) and sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (8, 32)
    assert torch.count_nonzero(up[32:64]) == 0 and torch.count_nonzero(up[:32, 4:]) == 0
    assert all(k.rsplit(".", 2)[0] + ".alpha" in sd for k in sd if k.endswith("lora_down.weight"))
    assert sd["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 2.0


def test_kohya_file_stands_for_exactly_the_trained_update():
    dims = FluxDims(32, 128, 1, 1)
    lora = trained_like(MIXED, dims)
    sd = export.kohya_state_dict(lora)
    for module, weights in lora.by_module().items():
        key = "lora_unet_" + module.replace(".", "_")
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        delta = up @ down * (sd[f"{key}.alpha"] / down.shape[0])  # what ComfyUI's loader computes
        expected = torch.zeros(weights[0].target.out_features, weights[0].target.in_features)
        for w in weights:
            expected[w.rows[0]:w.rows[1]] += w.scale * w.up @ w.down
        assert torch.allclose(delta, expected, atol=1e-6), module


def _velocity(backend, lora=None):
    torch.manual_seed(0)
    args = (torch.randn(1, 16, 8, 8), torch.tensor([0.5]),
            Conditioning(torch.randn(1, 10, 64), torch.randn(1, 64), 3.5))
    with torch.no_grad():
        if lora is None:
            return backend.velocity(*args)
        with backend.lora_applied(lora):
            return backend.velocity(*args)


def _load_into(transformer, path):
    sd, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=transformer, adapter_name="t")


def test_diffusers_format_loads_into_diffusers_with_the_same_outputs(tmp_path):
    from trainer.families.flux1 import tiny

    model = tiny.build(seed=3)
    backend = model.backend()
    lora = trained_like(MIXED.__class__(MIXED.groups[:1] + (LayerGroup(SINGLE, 1, 4, ("attn.to_q", "proj_mlp"), 4),)),
                        backend.dims)
    expected, base = _velocity(backend, lora), _velocity(backend)
    path = files.write_safetensors(tmp_path / "l.safetensors", export.state_dict(lora, "diffusers"), {})
    _load_into(model.transformer, path)
    got = _velocity(backend)
    assert not torch.allclose(expected, base, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5)


def test_kohya_format_loads_into_a_full_width_flux_with_the_same_outputs(tmp_path):
    """diffusers reads kohya FLUX files only at FLUX.1's real width (3072): one block of each kind."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)).eval().requires_grad_(False)
    backend = DiffusersFlux(transformer)
    lora = trained_like(MIXED, backend.dims, scale=0.01)
    expected, base = _velocity(backend, lora), _velocity(backend)
    path = files.write_safetensors(tmp_path / "k.safetensors", export.state_dict(lora, "kohya"), {})
    _load_into(transformer, path)
    got = _velocity(backend)
    assert not torch.allclose(expected, base, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5)


def test_metadata_records_the_training(tmp_path):
    meta = export.LoraMetadata(MIXED, trigger_word="sks", base_model="FLUX.1-dev").header(steps=1200)
    lora = trained_like(MIXED, FluxDims(32, 128, 1, 1))
    path = files.write_safetensors(tmp_path / "m.safetensors", export.state_dict(lora), meta)
    got = export.read_metadata(path)
    assert got["dreambooth.trigger_word"] == "sks" and got["dreambooth.base_model"] == "FLUX.1-dev"
    assert got["dreambooth.steps"] == "1200" and got["dreambooth.rank"] == "3,4,6"
    assert got["dreambooth.alpha"] == "2,3" and got["dreambooth.version"] == export.__version__
    assert LayerSpec.from_json(got["dreambooth.layers"]) == MIXED
    assert got["ss_network_dim"] == "6" and got["modelspec.trigger_phrase"] == "sks"
    assert json.loads(got["dreambooth.trigger_words"]) == ["sks"]


def test_metadata_lists_each_subjects_trigger():
    got = export.LoraMetadata(MIXED, trigger_word=("sks", "xyz"), base_model="FLUX.1-dev").header(steps=10)
    assert json.loads(got["dreambooth.trigger_words"]) == ["sks", "xyz"]
    assert got["dreambooth.trigger_word"] == "sks"  # the first subject's: one word, as before
    assert got["modelspec.trigger_phrase"] == "sks, xyz"  # each phrase, as UIs list trigger phrases
    assert export.LoraMetadata(MIXED).header(steps=1)["dreambooth.trigger_words"] == "[]"


def test_a_failed_save_keeps_the_last_good_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    files.write_safetensors(path, {"a": torch.ones(2)}, {})
    assert path.stat().st_mode & 0o777 == 0o644  # readable by other programs, unlike a mkstemp file
    good = path.read_bytes()
    with pytest.raises(Exception):
        files.write_safetensors(path, {"a": "not a tensor"}, {})
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["lora.safetensors"]


@pytest.mark.parametrize("name", ["../evil", "/etc/lora", "a/../../b", "C:\\loras\\x", "sub/../../x", "", "dir/",
                                  ".", "./.", "sub/.."])
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="file name"):
        files.safe_path(tmp_path, name)


def test_links_that_leave_the_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        files.safe_path(tmp_path / "loras", "link/x")
    assert files.safe_path(tmp_path / "loras", "people/alice.safetensors") == \
        tmp_path / "loras" / "people" / "alice.safetensors"


def test_fp16_overflow_is_refused_rather_than_written_as_inf():
    lora = trained_like(MIXED, FluxDims(32, 128, 1, 1), scale=1e6)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        export.state_dict(lora, "kohya", torch.float16)
    bf16 = export.state_dict(lora, "kohya", torch.bfloat16)
    assert torch.isfinite(bf16["lora_unet_single_blocks_0_linear2.lora_up.weight"]).all()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_metadata_names_the_architecture_and_the_file(variant):
    """modelspec's architecture follows the model (not always dev); the base model is the file."""
    meta = export.LoraMetadata(MIXED, "sks", f"flux1-{variant}.safetensors", variant=variant).header(steps=10)
    assert meta["modelspec.architecture"] == f"flux-1-{variant}/lora"
    assert meta["dreambooth.base_model"] == meta["ss_sd_model_name"] == f"flux1-{variant}.safetensors"
    assert meta["dreambooth.family"] == meta["ss_base_model_version"] == "flux1"
    assert meta["dreambooth.variant"] == variant
