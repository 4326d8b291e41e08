"""The shipped quickstart workflows as the Templates menu serves them, read without a ComfyUI: each
one's layer groups name layers its Tiny FLUX family's model has, within that model's depth, and it
trains with a timestep sampling the Train node offers. (The host tests run them.)"""

import json
from pathlib import Path

import pytest

from trainer.families.flux1.layers import FluxDims
from trainer.families.flux2.layers import Flux2Dims
from trainer.loop.flow import TIMESTEP_SAMPLINGS
from trainer.lora.targets import LayerGroup, parse_layer_types

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
# the Tiny FLUX node's models (nodes/host/tiny.py): FLUX.1's is trainer/families/flux1/tiny.py's
TINY_DIMS = {"FLUX.1": FluxDims(256, 1024, 2, 4), "FLUX.2": Flux2Dims(256, 768, 2, 2)}


def nodes(name: str, node_type: str) -> list[dict]:
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return [n for n in workflow["nodes"] if n["type"] == node_type]


@pytest.mark.parametrize("name, family", [("flux_dreambooth_quickstart", "FLUX.1"),
                                          ("flux_dreambooth_quickstart_flux2", "FLUX.2")])
def test_each_quickstart_trains_layers_its_tiny_family_has(name, family):
    (tiny,) = nodes(name, "FluxDreamBoothTinyFlux")
    assert (tiny["widgets_values"][2:] or ["FLUX.1"])[0] == family  # FLUX.1's was saved before the input came
    dims = TINY_DIMS[family]
    groups = nodes(name, "FluxDreamBoothLayers")
    assert groups
    for node in groups:
        blocks, start, end, layer_types, rank, alpha = node["widgets_values"][:6]
        group = LayerGroup(blocks, start, end, parse_layer_types(layer_types, blocks, dims.vocabulary), rank,
                           alpha or None)
        group.check(dims)
    (train,) = nodes(name, "FluxDreamBoothTrain")
    assert train["widgets_values"][5] in TIMESTEP_SAMPLINGS
