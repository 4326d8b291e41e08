"""The shipped workflows as the Templates menu serves them, read without a ComfyUI: each one's layer
groups name layers its model has, within that model's depth (a quickstart's Tiny FLUX family, a real
workflow's full-size model through the stock loaders), it trains with a timestep sampling the Train
node offers, its links are the nodes' own and the pack's nodes hold their widget values in their
inputs' order. (The host tests validate and run them.)"""

import json
from pathlib import Path

import pytest

from trainer.families.flux1.layers import FluxDims
from trainer.families.flux2.layers import Flux2Dims
from trainer.loop.flow import TIMESTEP_SAMPLINGS
from trainer.lora.targets import LayerGroup, parse_layer_types

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
INTERFACE = json.loads(Path(__file__).with_name("node_interface.json").read_text())  # the pack's nodes' inputs
PYTHON_TYPES = {"STRING": str, "COMBO": str, "BOOLEAN": bool, "INT": int, "FLOAT": (int, float)}
# the Tiny FLUX node's models (nodes/host/tiny.py): FLUX.1's is trainer/families/flux1/tiny.py's
TINY_DIMS = {"FLUX.1": FluxDims(256, 1024, 2, 4), "FLUX.2": Flux2Dims(256, 768, 2, 2)}
# the full-size models (hidden, MLP width, double / single blocks): Kontext [dev] is FLUX.1 [dev]'s
FLUX1_DEV = FluxDims(3072, 12288, 19, 38)
FLUX2_KLEIN_4B = Flux2Dims(3072, 9216, 5, 20)


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def nodes(name: str, node_type: str) -> list[dict]:
    return [n for n in load(name)["nodes"] if n["type"] == node_type]


def check_layers_and_sampling(name: str, dims) -> str:
    """The workflow's layer groups fit `dims`; returns its Train node's timestep sampling (one the node offers)."""
    groups = nodes(name, "FluxDreamBoothLayers")
    assert groups
    for node in groups:
        blocks, start, end, layer_types, rank, alpha = node["widgets_values"][:6]
        group = LayerGroup(blocks, start, end, parse_layer_types(layer_types, blocks, dims.vocabulary), rank,
                           alpha or None)
        group.check(dims)
    (train,) = nodes(name, "FluxDreamBoothTrain")
    assert train["widgets_values"][5] in TIMESTEP_SAMPLINGS
    return train["widgets_values"][5]


@pytest.mark.parametrize("name, family", [("flux_dreambooth_quickstart", "FLUX.1"),
                                          ("flux_dreambooth_quickstart_flux2", "FLUX.2")])
def test_each_quickstart_trains_layers_its_tiny_family_has(name, family):
    (tiny,) = nodes(name, "FluxDreamBoothTinyFlux")
    assert (tiny["widgets_values"][2:] or ["FLUX.1"])[0] == family  # FLUX.1's was saved before the input came
    check_layers_and_sampling(name, TINY_DIMS[family])


@pytest.mark.parametrize("name, unet, dims, sampling", [
    ("flux_dreambooth_flux1_dev_people", "flux1-dev.safetensors", FLUX1_DEV, "flux_shift"),
    ("flux_dreambooth_flux2_klein_4b_base", "flux-2-klein-base-4b.safetensors", FLUX2_KLEIN_4B, "flux2_shift"),
    ("flux_dreambooth_kontext_dev", "flux1-kontext-dev.safetensors", FLUX1_DEV, "weighted")])
def test_each_real_workflow_trains_layers_its_full_size_model_has(name, unet, dims, sampling):
    (loader,) = nodes(name, "UNETLoader")
    assert loader["widgets_values"][0] == unet
    assert check_layers_and_sampling(name, dims) == sampling


def test_the_klein_workflow_samples_base_klein_with_cfg_and_no_flux_guidance():
    name = "flux_dreambooth_flux2_klein_4b_base"
    assert not nodes(name, "FluxGuidance")
    assert nodes(name, "EmptyFlux2LatentImage")
    (clip,) = nodes(name, "CLIPLoader")
    assert clip["widgets_values"][1] == "flux2"
    for sampler in nodes(name, "KSampler"):
        assert sampler["widgets_values"][3] > 1  # cfg: [seed, control, steps, cfg, sampler, scheduler, denoise]


def test_the_kontext_workflow_trains_on_pairs_and_edits_through_reference_latent():
    name = "flux_dreambooth_kontext_dev"
    (dataset,) = nodes(name, "FluxDreamBoothDatasetFolder")
    assert dataset["widgets_values"][17]  # control_folder: the before-images
    workflow = load(name)
    by_id = {n["id"]: n["type"] for n in workflow["nodes"]}
    edges = {(by_id[src], by_id[dst]) for _, src, _, dst, _, _ in workflow["links"]}
    assert {("LoadImage", "FluxKontextImageScale"), ("FluxKontextImageScale", "VAEEncode"),
            ("VAEEncode", "ReferenceLatent"), ("ReferenceLatent", "FluxGuidance"),
            ("FluxGuidance", "KSampler")} <= edges


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_every_link_is_the_one_its_nodes_name(path):
    """[id, from node, from slot, to node, to slot, type]: the source output lists it, the target
    input holds it, both of its type; no node names a link the list lacks."""
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        output, target = by_id[src]["outputs"][src_slot], by_id[dst]["inputs"][dst_slot]
        assert link_id in output["links"] and output["type"] == kind
        assert target["link"] == link_id and target["type"] == kind
    named = {i["link"] for n in workflow["nodes"] for i in n.get("inputs", []) if i.get("link") is not None}
    named |= {x for n in workflow["nodes"] for o in n.get("outputs", []) for x in o.get("links") or []}
    assert named == set(links)
    assert workflow["last_node_id"] >= max(by_id) and workflow["last_link_id"] >= max(links)


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_every_pack_node_holds_its_widget_values_in_the_nodes_input_order(path):
    """widgets_values fill the node's widget inputs in order (required, then optional), each of its
    input's type: a workflow saved before an optional input came holds a prefix of them."""
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] not in INTERFACE:
            continue
        specs = (spec.split(": ") for spec in INTERFACE[node["type"]]["inputs"])
        declared = [(name, kind.split(" ")[0]) for name, kind in specs if kind.split(" ")[0] in PYTHON_TYPES]
        saved = [i["name"] for i in node["inputs"] if "widget" in i]
        assert saved == [name for name, _ in declared[:len(saved)]], node["type"]
        values = node.get("widgets_values") or []
        assert len(values) == len(saved), node["type"]
        for (name, kind), value in zip(declared, values):
            is_bool = isinstance(value, bool)
            assert isinstance(value, PYTHON_TYPES[kind]) and (is_bool == (kind == "BOOLEAN")), (node["type"], name)
