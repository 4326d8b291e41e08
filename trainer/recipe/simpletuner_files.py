"""SimpleTuner's companion files read into our recipe: the data-backend list (multidatabackend.json,
the datasets), lycoris_config.json (the LyCORIS network) and user_prompt_library.json (validation
prompts). Their keys are reported with the file's name first, `dataset.behitek.json[0].crop_aspect`
(no `[i]` when the file holds one dataset) or `lycoris_config.json.factor`, so the user knows which
file to edit.

SimpleTuner reads relative paths from its own folder (where `train.sh` runs: usually the one above
`config/`); our recipe's paths are relative to the config file, so they are rewritten to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import text
from .importing import Mapping, is_windows_path, our_keys


def truthy(value: Any) -> bool:
    """SimpleTuner's booleans: true, "true", "1", 1."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value) and value is not None


def number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class Place:
    """Where the config's paths lead: the config's folder, or SimpleTuner's folder above it."""

    base: Path  # the config file's folder: our recipe's paths are relative to it
    root: Path | None = None  # SimpleTuner's folder, once a relative path was found from it

    def find(self, value: str) -> Path | None:
        path = Path(value).expanduser()
        if path.is_absolute():
            return path if path.exists() else None
        for folder in (self.base, self.base.parent):
            if (folder / path).exists():
                self.root = self.root or folder
                return folder / path
        return None

    def ours(self, value: str) -> str:
        """A path of the file as our recipe writes it: relative to the config's folder."""
        if is_windows_path(value) or Path(value).expanduser().is_absolute():
            return value
        found = self.find(value) or (self.root or self.base) / Path(value)
        return value if found == self.base / Path(value) else os.path.relpath(found, self.base)

    def looked(self, value: str) -> str:
        if is_windows_path(value):
            return "a Windows path: the file comes from another machine"
        path = Path(value).expanduser()
        return str(path) if path.is_absolute() else f"looked in {self.base} and {self.base.parent}"


def load_companion(m: Mapping, key: str, value: Any, place: Place) -> tuple[str, Any] | None:
    """(file name, content) of a file the config names; None, with a note, when it is not here."""
    path = place.find(str(value)) if isinstance(value, str) and value.strip() else None
    if path is None:
        m.note(key, f"{value!r} does not exist here ({place.looked(str(value))}); change {key}.")
        return None
    if not path.is_file():
        m.drop(key, f"{path} is a folder; name the JSON file in it.")
        return None
    try:
        content, _ = text.parse(text.read_text(path), str(path))
    except text.UnreadableConfig as e:
        m.drop(key, str(e))
        return None
    return path.name, content


# diffusers layer names of FLUX.1 (our layers.layer_types; each block group takes the names it has)
ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_MLP = ["proj_mlp", "proj_out"]
NORMS = ["norm1.linear", "norm1_context.linear", "norm.linear"]
LYCORIS_MODULES = {"Attention": ATTENTION, "FluxAttention": ATTENTION, "FeedForward": FEED_FORWARD,
                   "Linear": ATTENTION + FEED_FORWARD + SINGLE_MLP + NORMS}
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "lokr": "lokr", "loha": "loha"}


def read_lycoris(m: Mapping, name: str, cfg: Any, fallback_rank: Any) -> bool:
    """lycoris_config.json; True when its network's size (linear_dim, alpha) is honoured."""
    if not isinstance(cfg, dict):
        m.drop(name, f"{name} holds {type(cfg).__name__}, not LyCORIS's settings ({{\"algo\": \"lokr\", …}}).")
        return False
    algo = str(cfg.get("algo", "lora")).strip().lower()  # LyCORIS's default algo is lora
    variant = LYCORIS_ALGOS.get(algo)
    if "algo" in cfg:
        key = f"{name}.algo"
        if variant is None:
            m.drop(key, f"LyCORIS's {algo} is not in this pack (it trains lora; lokr and loha would be "
                        "layers.variant).")
        elif variant == "lora" and "layers.variant" not in our_keys():
            m.same(key)
        else:
            m.set(key, "layers.variant", variant)
    if "dora_wd" in cfg:
        if truthy(cfg["dora_wd"]) and variant == "lora":
            m.set(f"{name}.dora_wd", "layers.variant", "dora")
        else:
            m.same(f"{name}.dora_wd", None if not truthy(cfg["dora_wd"]) else f"used only with algo lora, not {algo}")
    sized = variant == "lora" or (variant is not None and m.settings.get("layers.variant") == variant)
    for field, ours in (("linear_dim", "layers.rank"), ("linear_alpha", "layers.alpha")):
        if field not in cfg:
            continue
        if sized:
            m.set(f"{name}.{field}", ours, cfg[field])
        else:
            m.drop(f"{name}.{field}", f"the size of LyCORIS's {algo} (it would be {ours} with layers.variant "
                                      f"{variant or algo}); this recipe trains a plain LoRA at rank {fallback_rank}.")
    for field, ours in (("factor", "layers.lokr_factor"), ("full_matrix", "layers.lokr_full_rank")):
        if field in cfg:
            if variant == "lokr":
                m.set(f"{name}.{field}", ours, cfg[field])
            else:
                m.same(f"{name}.{field}", f"used only by LyCORIS's lokr, not {algo}")
    if "multiplier" in cfg:
        if number(cfg["multiplier"]) == 1:
            m.same(f"{name}.multiplier")
        else:
            m.drop(f"{name}.multiplier", "the LoRA trains at strength 1; set the strength in ComfyUI's LoraLoader.")
    _lycoris_preset(m, name, cfg.get("apply_preset"), cfg.get("factor"), variant)
    return sized


def _lycoris_preset(m: Mapping, name: str, preset: Any, factor: Any, variant: str | None) -> None:
    """apply_preset: which module classes get the network (our layer types), and per-class settings."""
    if not isinstance(preset, dict) or "target_module" not in preset:
        m.settings.setdefault("layers.layer_types", LYCORIS_MODULES["Linear"])
        m.notes.append(f"{name}: without apply_preset.target_module LyCORIS wraps every Linear layer; here every "
                       "layer of the blocks (not the embedders or the final layer).")
        if isinstance(preset, dict) and not preset:
            m.same(f"{name}.apply_preset")
    if isinstance(preset, dict) and "target_module" in preset:
        key, modules = f"{name}.apply_preset.target_module", preset["target_module"]
        modules = [modules] if isinstance(modules, str) else list(modules or [])
        unknown = [str(x) for x in modules if x not in LYCORIS_MODULES]
        types = list(dict.fromkeys(t for x in modules for t in LYCORIS_MODULES.get(x, [])))
        if unknown or not types:
            m.drop(key, f"{', '.join(unknown) or 'no module'}: this pack maps LyCORIS's Attention, FeedForward and "
                        "Linear to its layers; the recipe keeps layers.preset.")
        else:
            m.set(key, "layers.layer_types", types)
    algo_map = preset.get("module_algo_map") if isinstance(preset, dict) else None
    for module, settings in (algo_map or {}).items():
        for field, value in (settings or {}).items() if isinstance(settings, dict) else []:
            key = f"{name}.apply_preset.module_algo_map.{module}.{field}"
            if field == "factor" and variant == "lokr" and number(value) == number(factor):
                m.same(key) if "layers.lokr_factor" in m.settings else m.set(key, "layers.lokr_factor", value)
            else:
                m.drop(key, f"{module}'s own {field} {value!r}: this pack has one setting for every layer "
                            f"(layers.lokr_factor), {name}'s {field} {factor!r}.")


def read_prompts(m: Mapping, name: str, library: Any) -> list[tuple[str, str]]:
    """user_prompt_library.json: {nickname: prompt} → (key, prompt) pairs."""
    if not isinstance(library, dict):
        m.drop(name, f"{name} holds {type(library).__name__}, not {{nickname: prompt}}.")
        return []
    out = []
    for nickname, prompt in library.items():
        key = f"{name}.{nickname}"
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            key, prompt = f"{key}.prompt", prompt["prompt"]
        if isinstance(prompt, str) and prompt.strip():
            out.append((key, prompt))
        else:
            m.drop(key, f"{prompt!r} is not a prompt (write \"{nickname}\": \"a photo of …\").")
    return out
