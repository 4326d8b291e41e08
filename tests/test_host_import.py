"""Host tests for Import Training Config: a config file in ComfyUI's input folder (or pasted) trains
through the Train node with the config's settings, not the node's widgets (in-process ComfyUI)."""

import json
import shutil
from pathlib import Path

import pytest
from comfyui_host import requires_host, train_prompt
from safetensors import safe_open

pytestmark = requires_host

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"
RECIPE = """
dataset: {folders: [photos], trigger: sks, class_word: toy, resolution: [64]}
layers: {preset: attention, rank: 4, alpha: 2}
train: {steps: 3, learning_rate: 2.0e-3, seed: 0, optimizer: lion, lr_schedule: linear}
save: {name: imported, every: 2, keep_last: 1}
validation: {prompts: ["a photo of [trigger] toy"], every: 3, steps: 2, size: 64, before_training: false}
"""


def import_prompt(**inputs) -> dict:
    """train_prompt's graph with Import Training Config feeding every optional input of Train."""
    prompt = train_prompt(steps=50, learning_rate=1e-4)  # widgets the imported config must override
    del prompt["2"], prompt["3"]
    prompt["6"] = {"class_type": "FluxDreamBoothImportConfig",
                   "inputs": {"config_path": "", "config_text": "", **inputs}}
    prompt["4"]["inputs"].update(dataset=["6", 0], lora_layers=["6", 1], settings=["6", 2], validation=["6", 3],
                                 run=["6", 4])
    return prompt


def photos(host) -> Path:
    folder = host.root / "input" / "recipes" / "photos"
    if not folder.exists():
        shutil.copytree(QUICKSTART, folder)
    return folder


def test_a_recipe_file_in_the_input_folder_trains_with_its_own_settings(host):
    folder = photos(host)
    (folder.parent / "toy.yaml").write_text(RECIPE)
    outputs = host.run(import_prompt(config_path="recipes/toy.yaml"))
    summary = outputs["6"]["text"][0]
    assert "ours format" in summary and "3 steps" in summary and "Unsupported: none" in summary
    trained = outputs["4"]["text"][0]
    assert trained.startswith("3 steps") and "run imported_001" in trained  # not the widgets' 50
    run = host.root / "output" / "flux_dreambooth" / "imported_001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003"]  # keep_last 1
    assert list((run / "samples").glob("*.png"))  # the config's validation prompt was rendered
    saved = host.root / "loras" / outputs["5"]["text"][0]
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
    assert ranks <= {4, 8, 12} and (meta["dreambooth.rank"], meta["dreambooth.alpha"]) == ("4", "2")  # the config's
    # layers section (ComfyUI's fused q/k/v and linear1 are saved as one module: 2 or 3 × the rank)
    assert (meta["dreambooth.optimizer"], meta["dreambooth.lr_schedule"], float(meta["dreambooth.learning_rate"])) \
        == ("lion", "linear", 2e-3)  # its train section, not the widgets' adamw, constant, 1e-4
    layers = json.loads(meta["dreambooth.layers"])  # the preset, fitted to the tiny model's depths
    assert {g["blocks"] for g in layers} == {"transformer_blocks", "single_transformer_blocks"}
    assert not any("proj_mlp" in g["layer_types"] or "ff.net.0.proj" in g["layer_types"] for g in layers)


def test_pasted_text_reads_folders_from_the_input_folder(host):
    photos(host)
    outputs = host.run(import_prompt(config_text=RECIPE.replace("[photos]", "[recipes/photos]")
                                     .replace("steps: 3,", "steps: 2,")))
    assert outputs["4"]["text"][0].startswith("2 steps")


@pytest.mark.parametrize("inputs, message", [
    ({"config_path": "recipes/nowhere.yaml"}, "does not exist"),
    ({}, "config_path and config_text are both empty"),
    ({"config_text": RECIPE.replace("[photos]", "[no_such_folder]")}, "dataset.folders is 'no_such_folder'"),
])
def test_bad_configs_are_refused_by_name_before_training(host, inputs, message):
    runs = host.root / "output" / "flux_dreambooth"
    before = sorted(runs.glob("imported_*"))
    with pytest.raises(RuntimeError, match=message):
        host.run(import_prompt(**inputs))
    assert sorted(runs.glob("imported_*")) == before  # no run folder was made
