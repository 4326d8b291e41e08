"""Host test: Validation Samples with a CLIP_VISION (a toy-width CLIP vision model through ComfyUI's
own ClipVisionModel) scores every render: scores.csv/json, the websocket events, the best
checkpoint in the Train node's text, the base samples kept, Load Checkpoint LoRA starting at it."""

import csv
import json
import re

import pytest
from comfyui_host import requires_host, train_prompt

pytestmark = requires_host

VALIDATION = {"prompts": "a photo of [trigger] toy on the beach\na red cube", "seeds": "7", "guidance": "3.5",
              "sample_steps": "3", "width": 64, "height": 64, "every_n_steps": 2, "sampler_name": "euler",
              "scheduler": "simple", "before_training": True}


@pytest.fixture
def tiny_clip_vision_node(host):
    """A node giving the pack's toy CLIP_VISION, standing in for Load CLIP Vision (no weights to load here)."""
    vision = next(m for name, m in __import__("sys").modules.items() if name.endswith("nodes.host.vision")
                  and hasattr(m, "tiny_clip_vision"))

    class TinyClipVision:
        CATEGORY, FUNCTION, RETURN_TYPES = "tests", "load", ("CLIP_VISION",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return (vision.tiny_clip_vision(0),)

    host.nodes.NODE_CLASS_MAPPINGS["TestTinyClipVision"] = TinyClipVision
    yield "TestTinyClipVision"
    del host.nodes.NODE_CLASS_MAPPINGS["TestTinyClipVision"]


def test_validation_with_a_clip_vision_scores_every_render_and_names_the_best_checkpoint(host, tiny_clip_vision_node):
    prompt = train_prompt(steps=4, run=["21", 0], validation=["20", 0])
    prompt["21"] = {"class_type": "FluxDreamBoothRun", "inputs": {
        "run_name": "scored", "save_every_n_steps": 2, "keep_last": 0, "resume_from": "", "plot_every_n_steps": 2}}
    prompt["20"] = {"class_type": "FluxDreamBoothValidation",
                    "inputs": {**VALIDATION, "clip_vision": ["22", 0], "max_drift": 0.5}}
    prompt["22"] = {"class_type": tiny_clip_vision_node, "inputs": {}}
    outputs = host.run(prompt)
    folder = host.root / "output" / "flux_dreambooth" / "scored_001"
    saved = json.loads((folder / "scores.json").read_text())
    assert [r["step"] for r in saved["rows"]] == [0, 2, 4]
    with open(folder / "scores.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 2, 4]
    assert saved["rows"][0]["drift"] == pytest.approx(0.0, abs=1e-4)  # step 0: the LoRA is zero, as the base
    assert saved["max_drift"] == 0.5 and all(-1 <= r["likeness"] <= 1 for r in saved["rows"])
    best = saved["best"]["step"]
    assert (folder / "checkpoints" / f"step_{best:06d}").is_dir()
    text = outputs["4"]["text"][0]
    assert re.search(rf"best checkpoint: step {best} \(likeness -?\d\.\d{{3}}, drift \d\.\d{{3}}\)", text), text
    events = [d for e, d in host.server.events if e == "flux_dreambooth.scores"]
    assert [d["step"] for d in events] == [0, 2, 4] and events[-1]["drift"] == saved["rows"][-1]["drift"]
    kept = json.loads((folder / "scores" / "base.json").read_text())
    assert kept["render"] == "seed 7, 3 steps, guidance 3.5, 64×64, euler/simple"
    base = kept["prompts"]
    assert base == ["a photo of toy on the beach", "a bowl of fruit on a wooden table",
                    "a city street at night, rain", "a mountain lake at sunrise"]  # class word for the trigger
    assert len(list((folder / "scores").glob("base_*.png"))) == len(base)
    recipe = (folder / "recipe.yaml").read_text()
    assert "max_drift: 0.5" in recipe and "the scores' CLIP_VISION is a model ComfyUI loaded" in recipe
    load = host.nodes.NODE_CLASS_MAPPINGS["FluxDreamBoothLoadCheckpoint"].INPUT_TYPES()["required"]["checkpoint"]
    assert load[1]["default"] == f"scored_001/checkpoints/step_{best:06d}"
