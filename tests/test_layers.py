import json
import re
from pathlib import Path

import pytest

from trainer.families.flux1.layers import DOUBLE, SINGLE, FluxDims
from trainer.lora.targets import LayerGroup, LayerSpec, parse_layer_types

SEED_000 = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_45563bde6d4690b7.txt"
FLUX1 = FluxDims()

# The three lora_layers blocks of seed 000 (mflux's DreamBooth guide), verbatim.
PETS = {"single_transformer_blocks": {"block_range": {"start": 0, "end": 38},
                                      "layer_types": ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"],
                                      "lora_rank": 4}}
PEOPLE = {"single_transformer_blocks": {"block_range": {"start": 10, "end": 38},
                                        "layer_types": ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"],
                                        "lora_rank": 8}}
ART = {"transformer_blocks": {"block_range": {"start": 5, "end": 15},
                              "layer_types": ["attn.to_q", "attn.to_k", "attn.to_v"], "lora_rank": 16},
       "single_transformer_blocks": {"block_range": {"start": 20, "end": 38},
                                     "layer_types": ["proj_out", "proj_mlp"], "lora_rank": 8}}


@pytest.mark.parametrize("config, count", [(PETS, 38 * 5), (PEOPLE, 28 * 5), (ART, 10 * 3 + 18 * 2)])
def test_seed_templates_select_the_documented_layers(config, count):
    targets = LayerSpec.from_mflux(config).targets(FLUX1)
    assert len(targets) == count
    assert len({t.name for t in targets}) == count


def test_templates_in_the_seed_document_are_the_ones_tested():
    if not SEED_000.exists():
        pytest.skip("seed documents not present next to this checkout")
    blocks = re.findall(r"```json\n(.*?)```", SEED_000.read_text(), re.S)
    layers = [json.loads(b)["lora_layers"] for b in blocks if '"lora_layers"' in b]
    assert layers == [PETS, PEOPLE, ART]


def test_fused_layers_are_sliced_by_rows():
    spec = LayerSpec((LayerGroup(DOUBLE, 0, 1, ("attn.to_k", "attn.add_v_proj"), 4),
                      LayerGroup(SINGLE, 3, 4, ("attn.to_q", "proj_mlp", "proj_out"), 4)))
    t = {x.name: x for x in spec.targets(FLUX1)}
    h, m = 3072, 12288
    assert (t["transformer_blocks.0.attn.to_k"].bfl_module, t["transformer_blocks.0.attn.to_k"].rows) == \
        ("double_blocks.0.img_attn.qkv", (h, 2 * h))
    assert (t["transformer_blocks.0.attn.add_v_proj"].bfl_module, t["transformer_blocks.0.attn.add_v_proj"].rows) == \
        ("double_blocks.0.txt_attn.qkv", (2 * h, 3 * h))
    assert t["single_transformer_blocks.3.attn.to_q"].rows == (0, h)
    assert t["single_transformer_blocks.3.proj_mlp"].rows == (3 * h, 3 * h + m)
    assert t["single_transformer_blocks.3.proj_mlp"].out_features == 3 * h + m
    assert (t["single_transformer_blocks.3.proj_out"].bfl_module, t["single_transformer_blocks.3.proj_out"].in_features,
            t["single_transformer_blocks.3.proj_out"].rows) == ("single_blocks.3.linear2", h + m, (0, h))


def test_unknown_layer_name_lists_the_valid_choices():
    with pytest.raises(ValueError) as e:
        LayerGroup(SINGLE, 0, 38, ("proj_out", "attn.to_out.0"), 8)
    assert "'attn.to_out.0'" in str(e.value) and "proj_mlp" in str(e.value) and "norm.linear" in str(e.value)


def test_range_past_the_model_depth_names_the_valid_range():
    with pytest.raises(ValueError, match=r"ends at 20, but this model has 19 transformer_blocks.*end 19"):
        LayerSpec((LayerGroup(DOUBLE, 0, 20, ("attn.to_q",), 8),)).targets(FLUX1)
    with pytest.raises(ValueError, match="start must be"):
        LayerGroup(SINGLE, 12, 12, ("proj_out",), 8)


def test_a_layer_in_two_groups_is_refused():
    spec = LayerSpec((LayerGroup(SINGLE, 0, 10, ("proj_out",), 8), LayerGroup(SINGLE, 5, 20, ("proj_out",), 4)))
    with pytest.raises(ValueError, match="single_transformer_blocks.5.proj_out is selected by layer group 1"):
        spec.targets(FLUX1)


def test_bad_rank_and_alpha_are_refused():
    with pytest.raises(ValueError, match="lora_rank"):
        LayerGroup(SINGLE, 0, 1, ("proj_out",), 0)
    with pytest.raises(ValueError, match="alpha"):
        LayerGroup(SINGLE, 0, 1, ("proj_out",), 4, -1.0)


def test_alpha_sets_the_scale():
    assert LayerGroup(SINGLE, 0, 1, ("proj_out",), 32, 16.0).scale == 0.5
    assert LayerGroup(SINGLE, 0, 1, ("proj_out",), 8).scale == 1.0


def test_layer_type_text_and_presets():
    assert parse_layer_types("proj_out, attn.to_q  proj_out", SINGLE) == ("proj_out", "attn.to_q")
    assert parse_layer_types("attention", DOUBLE, FLUX1.vocabulary)[:3] == ("attn.to_q", "attn.to_k", "attn.to_v")
    assert parse_layer_types("attention proj_out", SINGLE) == ("attention", "proj_out")  # expanded by the model
    spec = LayerSpec.preset("attention+mlp", FluxDims(256, 1024, 2, 4), rank=4)
    assert len(spec.targets(FluxDims(256, 1024, 2, 4))) == 2 * 12 + 4 * 5


@pytest.mark.parametrize("broken, message", [
    ({"single_transformer_blocks": {"block_range": {"start": 0}, "layer_types": ["proj_out"]}}, "block_range"),
    ({"single_transformer_blocks": {"block_range": {"start": 0, "end": 4}, "layer_types": "proj_out"}},
     "list of names"),
    ({"single_transformer_blocks": {"block_range": {"start": 0, "end": 4}, "layer_types": ["proj_out"],
                                    "lora_rank": 0}}, "lora_rank is 0"),
])
def test_broken_mflux_layers_name_the_config(broken, message):
    with pytest.raises(ValueError, match=f"train.json.*{message}|{message}.*train.json"):
        LayerSpec.from_mflux(broken, source="train.json")


def test_spec_round_trips_through_json():
    spec = LayerSpec.from_mflux(ART)
    assert LayerSpec.from_json(spec.to_json()) == spec
