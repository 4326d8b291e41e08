"""The family registry: what each family states, and files of one family refused on another."""

from dataclasses import replace

import pytest
import torch

from trainer import families
from trainer.families.conditioning import Conditioning
from trainer.families.flux1 import FAMILY as FLUX1
from trainer.families.flux1.layers import SINGLE
from trainer.loop.flow import TimestepSampling
from trainer.lora.targets import LayerGroup, LayerSpec, parse_layer_types
from trainer.outputs import checkpoints


def test_every_family_names_the_same_presets_and_its_layout():
    for name, family in families.FAMILIES.items():
        assert family.name == name
        assert {"attention", "attention+mlp"} <= set(family.vocabulary.presets)
        assert families.of_layout(family.layout()) is family  # a checkpoint's dims find their family


def test_an_unknown_family_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="'flux9'.*flux1"):
        families.family("flux9")


def test_a_checkpoint_of_another_family_is_refused_by_name():
    other = replace(FLUX1, name="flux2", label="FLUX.2")
    with pytest.raises(ValueError, match="trained a FLUX.1 LoRA, but the MODEL is FLUX.2"):
        checkpoints.check_family({"family": "flux1"}, other)
    checkpoints.check_family({}, FLUX1)  # checkpoints from before families trained FLUX.1


def test_conditioning_batches_captions_with_and_without_a_pooled_vector():
    texts = [(torch.randn(5, 8), torch.randn(4)), (torch.randn(5, 8), torch.randn(4))]
    cond = Conditioning.of(texts, guidance=3.5)
    assert cond.context.shape == (2, 5, 8) and cond.pooled.shape == (2, 4) and cond.batch == 2
    bare = Conditioning.of([(t, None) for t, _ in texts])
    assert bare.pooled is None and bare.to(torch.device("cpu")).pooled is None


def _rows_of(family, preset: str) -> set[tuple[str, str, str | None]]:
    """(group, BFL module, slice) that a preset trains, whatever the family calls them."""
    vocabulary = family.vocabulary
    return {(group, *vocabulary.layers[group][name]) for group, names in vocabulary.presets[preset].items()
            for name in names}


def test_presets_train_the_same_rows_in_flux1_and_flux2():
    flux2 = families.family("flux2")
    for preset in ("attention", "attention+mlp"):
        assert _rows_of(FLUX1, preset) - {(g, m, p) for g, m, p in _rows_of(FLUX1, preset) if "mod" in m} \
            == _rows_of(flux2, preset)


def test_flux2_single_block_mlp_slice_is_gate_and_up():
    dims = families.family("flux2").layout(hidden_size=64, mlp_hidden=192, double_blocks=1, single_blocks=1)
    targets = LayerSpec.preset("attention+mlp", dims, rank=2).targets(dims)
    mlp = next(t for t in targets if t.name == "single_transformer_blocks.0.proj_mlp")
    assert mlp.out_features == 3 * 64 + 2 * 192 and mlp.rows == (192, 192 + 384)
    ff = next(t for t in targets if t.name == "transformer_blocks.0.ff.linear_in")
    assert (ff.in_features, ff.out_features) == (64, 384)


def test_a_layer_group_names_a_preset_that_each_family_expands_its_way():
    group = LayerGroup(SINGLE, 0, 1, parse_layer_types("attention", SINGLE), 2)
    flux1 = FLUX1.layout(64, 256, 1, 1)
    flux2 = families.family("flux2").layout(64, 192, 1, 1)
    assert [t.name.split(".", 2)[2] for t in LayerSpec((group,)).targets(flux1)][-1] == "proj_out"
    assert [t.name.split(".", 2)[2] for t in LayerSpec((group,)).targets(flux2)][-1] == "attn.to_out"


def test_a_whole_fused_layer_and_a_slice_of_it_are_refused_together():
    dims = families.family("flux2").layout(64, 192, 1, 1)
    group = LayerGroup(SINGLE, 0, 1, ("attn.to_qkv_mlp_proj", "attn.to_k"), 2)
    with pytest.raises(ValueError, match="same rows of one fused layer"):
        LayerSpec((group,)).targets(dims)


def test_flux2_shift_is_musubis_shift_on_flux2_tokens():
    flux2 = families.family("flux2")
    tokens = flux2.tokens(64, 64)  # a 1024² image: 64² latent pixels, one token each
    assert tokens == FLUX1.tokens(128, 128) == 4096
    a = TimestepSampling("flux2_shift").sample(1000, tokens, torch.Generator().manual_seed(0))
    b = TimestepSampling("flux_shift").sample(1000, tokens, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.mean() > 0.6  # 1024²: shifted to the noisy end
