"""A real ComfyUI, in this process, with the pack loaded the way ComfyUI loads custom nodes.

Set COMFYUI_PATH to a ComfyUI checkout to run the host tests; without it they are skipped.
Prompts run through ComfyUI's own validator and PromptExecutor; files go to a temporary tree.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PACK_DIR = Path(__file__).resolve().parent.parent
SKIP_REASON = "COMFYUI_PATH is not set: host tests need a ComfyUI checkout (see README, 'Tests')."
requires_host = pytest.mark.skipif(not COMFYUI_PATH, reason=SKIP_REASON)


class _Server:
    """What PromptExecutor needs of PromptServer: it records the events it is sent."""

    def __init__(self):
        self.client_id, self.last_node_id, self.last_prompt_id = None, None, None
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass

    def __getattr__(self, name):  # anything else ComfyUI may call on its server: a no-op
        return lambda *args, **kwargs: None


class Host:
    def __init__(self, root: Path):
        sys.path.insert(0, COMFYUI_PATH)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        # in main.py's order: ComfyUI's `utils` package before `nodes`, which (in v0.3.x) puts
        # comfy/ first on sys.path, where comfy/utils.py would shadow it
        importlib.import_module("utils.extra_config")
        import execution
        import folder_paths
        import server

        import nodes

        self.root = root
        for name in ("input", "output", "temp", "loras"):
            (root / name).mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(root / "input"))
        folder_paths.set_output_directory(str(root / "output"))
        folder_paths.set_temp_directory(str(root / "temp"))
        folder_paths.add_model_folder_path("loras", str(root / "loras"), is_default=True)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        before = set(nodes.NODE_CLASS_MAPPINGS)
        if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
            raise RuntimeError(f"ComfyUI could not load the pack from {PACK_DIR}")
        self.pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        init = str(PACK_DIR / "__init__.py")
        self.pack = next(m for m in list(sys.modules.values())
                         if getattr(m, "__file__", None) == init and hasattr(m, "comfy_entrypoint"))
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        self.server = _Server()
        self._hook_progress_like_the_server()
        server.PromptServer.instance = self.server  # the pack's websocket events: record them
        if "cache_args" in execution.PromptExecutor.__init__.__code__.co_varnames:  # v0.33+
            self.executor = execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        else:
            self.executor = execution.PromptExecutor(self.server)

    def _hook_progress_like_the_server(self):
        """What main.py's hijack_progress does: every progress update checks Cancel, then is sent."""
        import comfy.model_management
        import comfy.utils
        from comfy_execution.utils import get_executing_context

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            context = get_executing_context()
            comfy.model_management.throw_exception_if_processing_interrupted()
            node = node_id if node_id is not None else (context.node_id if context else None)
            self.server.send_sync("progress", {"value": value, "max": total, "node": node})

        comfy.utils.set_progress_bar_global_hook(hook)

    @property
    def version(self) -> str:
        import comfyui_version

        return comfyui_version.__version__

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns its UI outputs by node id."""
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt invalid: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
        self.server.events.clear()
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        self.server.events += self.executor.status_messages
        if not self.executor.success:
            errors = [d.get("exception_message", d) for e, d in self.executor.status_messages
                      if e in ("execution_error", "execution_interrupted")]
            raise RuntimeError(f"prompt failed: {errors}")
        return self.executor.history_result["outputs"]

    def output_file(self, ui: dict) -> Path:
        image = ui["images"][0]
        return Path(self.folder_paths.get_directory_by_type(image["type"])) / image["subfolder"] / image["filename"]


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """Turn a UI-format workflow (what the Templates menu loads) into an API prompt, the way the
    frontend does: links become [node, slot], widget values are matched to widget inputs in order."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] not in node_classes:  # muted, bypassed, or a Note
            continue
        cls = node_classes[node["type"]]
        spec = cls.INPUT_TYPES()
        ordered = list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, (kind, *opts) in ordered:
            options = opts[0] if opts else {}
            is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if is_widget and not options.get("forceInput"):
                value = next(values, options.get("default"))  # a workflow saved before an input was added
                if options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")):
                    next(values)  # the 'fixed'/'randomize' companion widget
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def by_type(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def train_prompt(**train_inputs) -> dict:
    """Tiny FLUX, the quickstart photos at 64², one layer group, Train (with `train_inputs`), Save."""
    prompt = {
        "1": {"class_type": "FluxDreamBoothTinyFlux", "inputs": {"seed": 0, "weight_dtype": "default"}},
        "2": {"class_type": "FluxDreamBoothDatasetFolder",
              "inputs": {"folder": "builtin:quickstart", "trigger_word": "sks", "class_word": "toy", "repeats": 1,
                         "captions": "auto", "default_caption": "", "subfolders_as_concepts": False,
                         "resolution": "64", "bucketing": True, "crop": "center", "upscale_small": False,
                         "problems": "stop"}},
        "3": {"class_type": "FluxDreamBoothLayers",
              "inputs": {"blocks": "single_transformer_blocks", "start": 0, "end": 4, "layer_types": "attention",
                         "rank": 4, "alpha": 0.0}},
        "4": {"class_type": "FluxDreamBoothTrain",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
                         "lora_layers": ["3", 0], "steps": 4, "learning_rate": 2e-3, "batch_size": 1,
                         "seed": 0, "guidance": 1.0, "timestep_sampling": "flux_shift",
                         "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 1e-4,
                         "checkpointing": "every block", "swap_blocks": 0, "compile": False,
                         "lora_dtype": "fp32", "ema_decay": 0.0, "cache": "memory"}},
        "5": {"class_type": "FluxDreamBoothSave",
              "inputs": {"lora": ["4", 1], "filename_prefix": "checks/lora", "format": "kohya", "precision": "fp16"}},
    }
    prompt["4"]["inputs"].update(train_inputs)
    return prompt
