"""Which layers get a LoRA, in the vocabulary our users' configs already use.

A selection is a list of groups like mflux's `lora_layers`:

    {"single_transformer_blocks": {"block_range": {"start": 10, "end": 38},
                                   "layer_types": ["proj_out", "attn.to_q"], "lora_rank": 8}}

Layer types are diffusers' names. Each model family says, in its `LayerVocabulary`, where a
name lives in the model ComfyUI loads (a module, and for fused layers a slice of its output
rows); its `ModelLayout` gives the sizes of the loaded model. Nothing here knows a family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

from .variants import check_variant

TRANSFORMER = "transformer"  # LoraTarget.component of the transformer's layers (text encoders: lora/text_encoder.py)


@dataclass(frozen=True)
class LayerVocabulary:
    """A family's LoRA layer names: diffusers' block groups, their layer types, presets."""

    groups: dict[str, str]  # diffusers block group -> BFL block group ("transformer_blocks" -> "double_blocks");
    # "" for a group of model-level layers (FLUX.2's shared modulation): depth 1, names without a block index
    layers: dict[str, dict[str, tuple[str, str | None]]]  # group -> layer type -> (BFL module, row slice)
    presets: dict[str, dict[str, tuple[str, ...]]]  # preset -> group -> layer types

    def names(self, blocks: str) -> str:
        return ", ".join(self.layers[blocks])


class ModelLayout(Protocol):
    """The sizes of a loaded model that targets are checked and sliced against."""

    vocabulary: LayerVocabulary

    def depth(self, blocks: str) -> int: ...

    def shape(self, bfl_module: str) -> tuple[int, int]: ...

    def rows(self, part: str | None, out_features: int) -> tuple[int, int]: ...


def _known_vocabularies() -> list[LayerVocabulary]:
    from ..families import vocabularies  # the registry imports the families, which import this module

    return vocabularies()


def _layer_types(blocks: str) -> dict[str, tuple[str, str | None]]:
    """Every layer type some family has in `blocks` (what a group is checked against before a
    model is known; the loaded model's family checks again)."""
    known: dict[str, tuple[str, str | None]] = {}
    for vocabulary in _known_vocabularies():
        known.update(vocabulary.layers.get(blocks, {}))
    return known


def _preset_names(blocks: str) -> set[str]:
    """The presets some family has for `blocks`: a group may name one until the model is known."""
    return {name for v in _known_vocabularies() for name, groups in v.presets.items() if blocks in groups}


@dataclass(frozen=True)
class LayerGroup:
    """One group of a selection: the same layer types, rank and alpha on a range of blocks.

    `end` is exclusive, as in mflux (`{"start": 0, "end": 38}` is all 38 single blocks).
    `alpha` defaults to the rank, so the LoRA's scale alpha/rank is 1. `variant` is what each
    layer trains (variants.py): lora, dora, lokr or loha; `lokr_factor` and `lokr_full_rank` shape
    a LoKr.
    """

    blocks: str
    start: int
    end: int
    layer_types: tuple[str, ...]
    rank: int = 8
    alpha: float | None = None
    variant: str = "lora"
    lokr_factor: int = -1
    lokr_full_rank: bool = False

    def __post_init__(self):
        check_variant(self.variant, self.lokr_factor)
        known = _layer_types(self.blocks)
        if not known:
            groups = sorted({g for v in _known_vocabularies() for g in v.layers})
            raise ValueError(f"blocks is {self.blocks!r}; choose {' or '.join(map(repr, groups))}.")
        if not self.layer_types:
            raise ValueError(f"layer_types for {self.blocks} is empty; choose from: {', '.join(known)}.")
        unknown = [t for t in self.layer_types if t not in known and t not in _preset_names(self.blocks)]
        if unknown:
            raise ValueError(f"Unknown layer type {', '.join(map(repr, unknown))} for {self.blocks}; "
                             f"valid choices: {', '.join(known)}.")
        if self.rank < 1:
            raise ValueError(f"lora_rank is {self.rank}; it must be at least 1 (4–32 is usual).")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha is {self.alpha}; it must be above 0 (or empty to use the rank).")
        if not 0 <= self.start < self.end:
            raise ValueError(f"block_range for {self.blocks} is {{start: {self.start}, end: {self.end}}}; "
                             "start must be ≥ 0 and below end (end is exclusive).")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def expanded(self, vocabulary: LayerVocabulary) -> "LayerGroup":
        """With any preset name ("attention") replaced by its layer types in `vocabulary`, the loaded
        family's: a preset means the same layers in every family, named as that family names them."""
        presets = {name: groups[self.blocks] for name, groups in vocabulary.presets.items() if self.blocks in groups}
        if not any(t in presets for t in self.layer_types):
            return self
        types: list[str] = []
        for name in self.layer_types:
            types.extend(t for t in presets.get(name, (name,)) if t not in types)
        return replace(self, layer_types=tuple(types))

    def check(self, layout: ModelLayout) -> None:
        """Against the loaded model: its family's names and its depth."""
        layers = layout.vocabulary.layers.get(self.blocks)
        if layers is None:
            raise ValueError(f"This model has no {self.blocks}; its block groups are "
                             f"{', '.join(layout.vocabulary.layers)}.")
        unknown = [t for t in self.layer_types if t not in layers]
        if unknown:
            raise ValueError(f"Unknown layer type {', '.join(map(repr, unknown))} for {self.blocks} of this model; "
                             f"valid choices: {', '.join(layers)}.")
        depth = layout.depth(self.blocks)
        if self.end > depth:
            raise ValueError(f"block_range for {self.blocks} ends at {self.end}, but this model has {depth} "
                             f"{self.blocks} (valid range: start 0 … end {depth}).")


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA to train: a diffusers layer of one block, and where it lives in BFL's layout."""

    name: str          # diffusers path, e.g. "single_transformer_blocks.3.attn.to_q"
    bfl_module: str    # BFL path, e.g. "single_blocks.3.linear1"
    part: str | None   # slice of a fused layer, or None for the whole layer
    rank: int
    scale: float
    in_features: int
    out_features: int  # of the BFL layer (the whole fused layer)
    rows: tuple[int, int]  # this target's output rows in it
    variant: str = "lora"  # what it trains: lora, dora, lokr, loha (variants.py)
    lokr_factor: int = -1
    lokr_full_rank: bool = False
    component: str = TRANSFORMER  # the model it lives in: the transformer, or a text encoder (clip_l, t5xxl)

    @property
    def whole(self) -> bool:
        """Whether this target is its layer's whole output (not a slice of a fused layer)."""
        return self.rows == (0, self.out_features)

    @property
    def block(self) -> str:
        """'double_blocks.3' / 'single_blocks.7': the block this target lives in."""
        return ".".join(self.bfl_module.split(".")[:2])


@dataclass(frozen=True)
class LayerSpec:
    """A whole selection: the groups, in order."""

    groups: tuple[LayerGroup, ...] = field(default_factory=tuple)

    def targets(self, layout: ModelLayout) -> list[LoraTarget]:
        """Every LoRA this selection trains, checked against the loaded model."""
        vocabulary = layout.vocabulary
        seen: dict[str, int] = {}
        targets = []
        for gi, group in enumerate(self.resolved(layout).groups):
            group.check(layout)
            for block in range(group.start, group.end):
                for layer in group.layer_types:
                    top = not vocabulary.groups[group.blocks]  # model-level layers: one "block", no index
                    name = layer if top else f"{group.blocks}.{block}.{layer}"
                    if name in seen:
                        raise ValueError(f"{name} is selected by layer group {seen[name] + 1} and again by group "
                                         f"{gi + 1}; each layer can be in one group only.")
                    seen[name] = gi
                    module, part = vocabulary.layers[group.blocks][layer]
                    bfl = module if top else f"{vocabulary.groups[group.blocks]}.{block}.{module}"
                    in_features, out_features = layout.shape(bfl)
                    rows = layout.rows(part, out_features)
                    overlap = [t for t in targets if t.bfl_module == bfl and t.rows[0] < rows[1] > rows[0] < t.rows[1]]
                    for other in overlap[:1]:
                        raise ValueError(f"{name} and {other.name} are the same rows of one fused layer ({bfl}); "
                                         "select the whole layer or its parts, not both.")
                    # a LoKr's rank sizes its second factor: at least half of it trains it whole (LyCORIS's
                    # linear_dim 10000 = full), so any rank is meaningful there
                    if group.variant != "lokr" and group.rank > min(in_features, rows[1] - rows[0]):
                        raise ValueError(f"lora_rank is {group.rank} for {name}, a {in_features}→{rows[1] - rows[0]} "
                                         f"layer: a rank above {min(in_features, rows[1] - rows[0])} adds nothing. "
                                         "Lower lora_rank (4–32 is usual).")
                    targets.append(LoraTarget(name, bfl, part, group.rank, group.scale, in_features,
                                              out_features, rows, group.variant, group.lokr_factor,
                                              group.lokr_full_rank))
        if not targets:
            raise ValueError("The LoRA layer selection is empty; add at least one layer group.")
        return targets

    def resolved(self, layout: ModelLayout) -> "LayerSpec":
        """The selection for this model: its preset names expanded in the model family's layer names
        (a recipe's selection is only known once the model's depths are; see recipe.build.RecipeLayers)."""
        groups = tuple(g.expanded(layout.vocabulary) for g in self.groups)
        return self if all(a is b for a, b in zip(groups, self.groups)) else LayerSpec(groups)

    def to_json(self) -> str:
        return json.dumps([asdict(g) for g in self.groups])

    @classmethod
    def from_json(cls, text: str) -> "LayerSpec":
        return cls(tuple(LayerGroup(**{**g, "layer_types": tuple(g["layer_types"])}) for g in json.loads(text)))

    @classmethod
    def from_mflux(cls, lora_layers: dict, source: str = "the config") -> "LayerSpec":
        """Read mflux's `lora_layers` block (its DreamBooth templates); errors name `source`."""
        groups = []
        for blocks, cfg in lora_layers.items():
            where = f"lora_layers.{blocks} in {source}"
            if not _layer_types(blocks):
                valid = sorted({g for v in _known_vocabularies() for g in v.layers})
                raise ValueError(f"lora_layers has {blocks!r} in {source}; valid keys: "
                                 f"{', '.join(map(repr, valid))}.")
            rng = cfg.get("block_range") if isinstance(cfg, dict) else None
            types = cfg.get("layer_types") if isinstance(cfg, dict) else None
            if not isinstance(rng, dict) or not {"start", "end"} <= rng.keys():
                raise ValueError(f"{where} needs \"block_range\": {{\"start\": …, \"end\": …}}.")
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
                raise ValueError(f"{where} needs \"layer_types\" as a list of names, e.g. [\"proj_out\"].")
            try:
                groups.append(LayerGroup(blocks, int(rng["start"]), int(rng["end"]), tuple(types),
                                         int(cfg.get("lora_rank", 8)), cfg.get("lora_alpha")))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
        return cls(tuple(groups))

    @classmethod
    def preset(cls, name: str, layout: ModelLayout, rank: int = 16, alpha: float | None = None,
               **variant) -> "LayerSpec":
        """A named selection on every block of every group (used when no layer groups are given);
        `variant`: LayerGroup's variant, lokr_factor, lokr_full_rank."""
        presets = layout.vocabulary.presets
        if name not in presets:
            raise ValueError(f"Unknown layer preset {name!r}; choose from {', '.join(presets)}.")
        return cls(tuple(LayerGroup(blocks, 0, layout.depth(blocks), tuple(types), rank, alpha, **variant)
                         for blocks, types in presets[name].items()))


def parse_layer_types(text: str, blocks: str, vocabulary: LayerVocabulary | None = None) -> tuple[str, ...]:
    """'attn.to_q, attn.to_k proj_out' -> ('attn.to_q', 'attn.to_k', 'proj_out'). Presets expand in
    `vocabulary` (the loaded family's); without one they stay names, expanded once the model is known
    (LayerSpec.resolved), since each family names a preset's layers its own way."""
    presets = {} if vocabulary is None else {name: groups[blocks] for name, groups in vocabulary.presets.items()
                                             if blocks in groups}
    out: list[str] = []
    for name in (t for t in text.replace(",", " ").split() if t):
        out.extend(n for n in presets.get(name, (name,)) if n not in out)
    return tuple(out)


def preset_names() -> list[str]:
    return list(dict.fromkeys(name for v in _known_vocabularies() for name in v.presets))
