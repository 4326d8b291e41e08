"""SimpleTuner's companion files read into our recipe: the data-backend list (multidatabackend.json,
the datasets), lycoris_config.json (the LyCORIS network) and user_prompt_library.json (validation
prompts). Their keys are reported with the file's name first, `dataset.behitek.json[0].crop_aspect`
(no `[i]` when the file holds one dataset) or `lycoris_config.json.factor`, so the user knows which
file to edit.

SimpleTuner reads relative paths from its own folder (where `train.sh` runs: usually the one above
`config/`); our recipe's paths are relative to the config file, so they are rewritten to it.
"""

from __future__ import annotations

import fnmatch
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
    _per_module(m, name, preset if isinstance(preset, dict) else {}, variant)


# LyCORIS's per-module settings our layer groups hold (SimpleTuner's module_algo_map / name_algo_map)
MODULE_FIELDS = {"algo": "variant", "linear_dim": "rank", "linear_alpha": "alpha", "factor": "lokr_factor",
                 "full_matrix": "lokr_full_rank"}
CONTAINERS = {**{t: "Attention" for t in ATTENTION}, **{t: "FeedForward" for t in FEED_FORWARD}}


def _module_settings(m: Mapping, key: str, settings: Any) -> dict:
    """One entry of module_algo_map / name_algo_map as our group keys; each field honoured or dropped."""
    out = {}
    for field, value in (settings or {}).items() if isinstance(settings, dict) else []:
        ours = MODULE_FIELDS.get(field)
        if field == "algo":
            value = LYCORIS_ALGOS.get(str(value).strip().lower())
            if value is None:
                m.drop(f"{key}.algo", f"LyCORIS's {settings['algo']} is not in this pack (lora, lokr, loha are).")
                continue
        elif field == "full_matrix":
            value = truthy(value)
        elif ours is not None:
            value = number(value)
            if value is None:
                m.drop(f"{key}.{field}", f"{settings[field]!r} is not a number.")
                continue
        if ours is None:
            m.drop(f"{key}.{field}", f"LyCORIS's per-module {field} is not a setting of this pack's layer groups "
                                     f"(they set {', '.join(MODULE_FIELDS)}).")
            continue
        out[ours] = int(value) if ours in ("rank", "lokr_factor") else value
    return out


def _per_module(m: Mapping, name: str, preset: dict, variant: str | None) -> None:
    """module_algo_map (by LyCORIS's module class: Attention, FeedForward, Linear) and name_algo_map
    (by module name, fnmatch patterns such as `single_transformer_blocks.1*`): layers whose settings
    differ from the file's own become layer groups of their own (layers.groups), each with its rank,
    alpha, variant and LoKr factor. A name's settings win over a class's, Attention/FeedForward's
    over Linear's, as LyCORIS applies them."""
    from .ai_toolkit.layers import every_layer  # FLUX.1's layers at full depth (end 0 = the last block)

    maps = {kind: preset.get(kind) for kind in ("module_algo_map", "name_algo_map")}
    entries = {kind: {str(k): _module_settings(m, f"{name}.apply_preset.{kind}.{k}", v)
                      for k, v in (found or {}).items()} if isinstance(found, dict) else {}
               for kind, found in maps.items()}
    for kind, found in maps.items():
        if found is not None and not isinstance(found, dict):
            m.drop(f"{name}.apply_preset.{kind}", f"{found!r}: give {{module: {{factor: …}}}}.")
    if not any(entries.values()):
        return
    s = m.settings
    base = {"variant": s.get("layers.variant", variant or "lora"), "rank": int(number(s.get("layers.rank")) or 16),
            "alpha": number(s.get("layers.alpha")) or 0.0, "lokr_factor": int(s.get("layers.lokr_factor", -1)),
            "lokr_full_rank": truthy(s.get("layers.lokr_full_rank", False))}
    types = set(s.get("layers.layer_types") or LYCORIS_MODULES["Linear"])
    per_layer = {}
    for layer in every_layer():
        blocks, block, kind = layer
        if kind not in types:
            continue
        full = f"{blocks}.{block}.{kind}"
        own = {**base, **entries["module_algo_map"].get("Linear", {}),
               **entries["module_algo_map"].get(CONTAINERS.get(kind, ""), {})}
        if kind in CONTAINERS and CONTAINERS[kind] == "Attention":
            own.update(entries["module_algo_map"].get("FluxAttention", {}))
        for pattern, settings in entries["name_algo_map"].items():
            if fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(full, f"{pattern}.*"):
                own.update(settings)
        per_layer[layer] = own
    keys = [f"{name}.apply_preset.{kind}.{k}.{f}" for kind in maps for k, v in (maps[kind] or {}).items()
            if isinstance(maps[kind], dict) for f in (v or {}) if isinstance(v, dict)]
    keys = [k for k in keys if not any(u.key == k for u in m.unsupported)]
    if all(own == base for own in per_layer.values()):
        for k in keys:
            m.same(k, "the same as the file's own setting")
        return
    groups = layer_groups(per_layer)
    for k in keys:
        m.set(k, "layers.groups", groups)
    m.notes.append(f"{name}: its per-module settings make {len(groups)} layers.groups, each with its own rank, "
                   "alpha, variant and lokr_factor.")


def layer_groups(per_layer: dict) -> list[dict]:
    """Our layers.groups for {(block group, block, layer type): group settings}: runs of consecutive
    blocks with the same layer types and settings, one group per distinct settings."""
    from .ai_toolkit.layers import DIMS, GROUPS

    groups = []
    for blocks in GROUPS:
        depth = DIMS.depth(blocks)
        rows = [tuple((kind, tuple(sorted(own.items()))) for (g, b, kind), own in per_layer.items()
                      if g == blocks and b == i) for i in range(depth)]  # in the vocabulary's order
        start = 0
        for i in range(1, depth + 1):
            if i < depth and rows[i] == rows[start]:
                continue
            by_settings: dict[tuple, list[str]] = {}
            for kind, own in rows[start]:
                by_settings.setdefault(own, []).append(kind)
            for own, kinds in by_settings.items():
                groups.append({"blocks": blocks, "start": start, "end": 0 if i == depth else i,
                               "layer_types": kinds, **dict(own)})
            start = i
    return groups


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
