"""Every node's public interface (id, inputs with names, types and order, outputs), held to the
snapshot in node_interface.json: a shared workflow stores exactly these, so a change here breaks
workflows people have saved. Changing the snapshot is a deliberate act:

    UPDATE_NODE_INTERFACE=1 COMFYUI_PATH=~/ComfyUI python -m pytest tests/test_node_interface.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from comfyui_host import requires_host

pytestmark = requires_host
SNAPSHOT = Path(__file__).with_name("node_interface.json")


def _type(kind) -> str:
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def interface(cls) -> dict:
    spec = cls.INPUT_TYPES()
    inputs = [f"{name}: {_type(kind)}{' (optional)' if section == 'optional' else ''}"
              for section in ("required", "optional") for name, (kind, *_) in spec.get(section, {}).items()]
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"inputs": inputs, "hidden": sorted(spec.get("hidden", {})),
            "outputs": [f"{name}: {_type(kind)}" for name, kind in zip(names, cls.RETURN_TYPES)],
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def test_every_node_keeps_its_id_inputs_and_outputs(host):
    current = {node_id: interface(host.nodes.NODE_CLASS_MAPPINGS[node_id]) for node_id in host.pack_nodes}
    if os.environ.get("UPDATE_NODE_INTERFACE"):
        SNAPSHOT.write_text(json.dumps(current, indent=1) + "\n")
    saved = json.loads(SNAPSHOT.read_text())
    assert sorted(current) == sorted(saved), "a node was added or removed: update the snapshot deliberately"
    for node_id in saved:
        assert current[node_id] == saved[node_id], f"{node_id}'s interface changed: shared workflows would break"


def test_every_input_has_a_tooltip_and_every_node_a_description(host):
    missing = []
    for node_id in host.pack_nodes:
        cls = host.nodes.NODE_CLASS_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        if not getattr(cls, "DESCRIPTION", ""):
            missing.append(f"{node_id}: description")
        for section in ("required", "optional"):
            for name, (_, *options) in spec.get(section, {}).items():
                if not (options and options[0].get("tooltip")):
                    missing.append(f"{node_id}.{name}")
    assert missing == [], missing


def test_nodes_sit_in_the_pack_category_with_display_names(host):
    for node_id in host.pack_nodes:
        cls = host.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY.startswith("FLUX DreamBooth"), node_id
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id), node_id
