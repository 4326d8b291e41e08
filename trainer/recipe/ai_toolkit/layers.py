"""Which FLUX layers an ai-toolkit network trains, in our recipe's terms, and back.

ai-toolkit puts a LoRA on every linear layer inside FLUX's blocks (`transformer_blocks.*`,
`single_transformer_blocks.*`, the modulation layers `norm1.linear` / `norm.linear` included),
named like `transformer.single_transformer_blocks.7.proj_out`. `network_kwargs` narrow that:
`ignore_if_contains` drops a layer whose name contains any of the words, `only_if_contains`
keeps only the layers whose name contains one (ai-toolkit's lora_special.py). A selection here
is the set of (block group, block, layer type) those filters leave, on the full-size FLUX.1.
"""

from __future__ import annotations

from typing import Iterable

from ...families.flux1.layers import DOUBLE, SINGLE, VOCABULARY, FluxDims

Layer = tuple[str, int, str]  # (block group, block index, diffusers layer type)
GROUPS = (DOUBLE, SINGLE)
DIMS = FluxDims()


def every_layer() -> list[Layer]:
    return [(g, b, t) for g in GROUPS for b in range(DIMS.depth(g)) for t in VOCABULARY.layers[g]]


def all_types() -> list[str]:
    """Every layer type of both block groups, in order, each once (what `layers.layer_types` lists
    to train them all)."""
    return list(dict.fromkeys(t for g in GROUPS for t in VOCABULARY.layers[g]))


def name(layer: Layer) -> str:
    group, block, kind = layer
    return f"transformer.{group}.{block}.{kind}"


def _words(value) -> list[str]:
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if str(v)]


def selected(only: Iterable[str] | None, ignore: Iterable[str] | None) -> set[Layer]:
    """The layers ai-toolkit trains with these filters (`only` None: no only-filter)."""
    ignore_words, only_words = _words(ignore or []), None if only is None else _words(only)
    chosen = set()
    for layer in every_layer():
        clean = name(layer)
        if any(w in clean for w in ignore_words):
            continue
        if only_words is not None and not any(w in clean or w in clean.replace(".", "$$") for w in only_words):
            continue
        chosen.add(layer)
    return chosen


def _preset_layers(preset: str) -> set[Layer]:
    return {(g, b, t) for g, types in VOCABULARY.presets[preset].items() for b in range(DIMS.depth(g)) for t in types}


def to_settings(chosen: set[Layer], rank: int) -> dict[str, object]:
    """Our `layers.*` settings that train exactly `chosen`: a preset, one list of layer types, one
    range of one block group, or groups of consecutive blocks with the same layer types."""
    for preset in VOCABULARY.presets:
        if chosen == _preset_layers(preset):
            return {"layers.preset": preset}
    per_group = {g: [frozenset(t for gg, b, t in chosen if gg == g and b == i) for i in range(DIMS.depth(g))]
                 for g in GROUPS}
    uniform = {g: blocks[0] for g, blocks in per_group.items() if len(set(blocks)) == 1 and blocks[0]}
    used = [g for g in GROUPS if any(per_group[g])]
    if set(used) == set(uniform):
        types = [t for t in all_types() if any(t in uniform[g] for g in used)]
        if all(uniform[g] == frozenset(t for t in types if t in VOCABULARY.layers[g]) for g in used):
            return {"layers.layer_types": types, **({"layers.blocks": used[0]} if len(used) == 1 else {})}
    groups = []
    for g in GROUPS:
        start = 0
        for i in range(1, DIMS.depth(g) + 1):
            if i < DIMS.depth(g) and per_group[g][i] == per_group[g][start]:
                continue
            if per_group[g][start]:
                groups.append({"blocks": g, "start": start, "end": 0 if i == DIMS.depth(g) else i,
                               "layer_types": [t for t in VOCABULARY.layers[g] if t in per_group[g][start]],
                               "rank": rank})
            start = i
    if len(groups) == 1:
        (one,) = groups
        return {"layers.blocks": one["blocks"], "layers.start": one["start"], "layers.end": one["end"],
                "layers.layer_types": one["layer_types"]}
    return {"layers.groups": groups}


def _matches(word: str) -> set[Layer]:
    return {layer for layer in every_layer() if word in name(layer)}


def cover(target: set[Layer]) -> list[str]:
    """Words whose matches together are exactly `target`: whole block groups, layer types, whole
    blocks, then single layers' full names."""
    words, covered = [], set()
    candidates = ([f"transformer.{g}." for g in GROUPS] + all_types()
                  + [f"transformer.{g}.{b}." for g in GROUPS for b in range(DIMS.depth(g))]
                  + [name(layer) for layer in every_layer()])
    for word in candidates:
        found = _matches(word)
        if found and found <= target and not found <= covered:
            words.append(word)
            covered |= found
        if covered == target:
            break
    return words


def to_filters(chosen: set[Layer]) -> dict[str, list[str]]:
    """ai-toolkit's `network_kwargs` that train exactly `chosen` (empty when it is every layer),
    whichever of only_if_contains and ignore_if_contains takes fewer words."""
    every = set(every_layer())
    if chosen == every:
        return {}
    keep, leave_out = cover(chosen), cover(every - chosen)
    return {"only_if_contains": keep} if len(keep) <= len(leave_out) else {"ignore_if_contains": leave_out}
