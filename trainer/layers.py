"""Which FLUX layers get a LoRA, in the vocabulary our users' configs already use.

A selection is a list of groups like mflux's `lora_layers`:

    {"single_transformer_blocks": {"block_range": {"start": 10, "end": 38},
                                   "layer_types": ["proj_out", "attn.to_q"], "lora_rank": 8}}

Layer types are diffusers' names. ComfyUI's FLUX (the original BFL layout) fuses some of
them into one Linear: q/k/v in double blocks, q/k/v/mlp-in in single blocks. Each diffusers
name therefore maps to a BFL module and, for fused ones, the slice of its output rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"
BFL_GROUP = {DOUBLE: "double_blocks", SINGLE: "single_blocks"}

# diffusers layer type -> (BFL module inside the block, slice of a fused output or None).
# Slices: "q", "k", "v" are hidden-size rows 0, 1, 2 of a fused qkv; "mlp" is what follows.
LAYER_TYPES = {
    DOUBLE: {
        "attn.to_q": ("img_attn.qkv", "q"),
        "attn.to_k": ("img_attn.qkv", "k"),
        "attn.to_v": ("img_attn.qkv", "v"),
        "attn.to_out.0": ("img_attn.proj", None),
        "attn.add_q_proj": ("txt_attn.qkv", "q"),
        "attn.add_k_proj": ("txt_attn.qkv", "k"),
        "attn.add_v_proj": ("txt_attn.qkv", "v"),
        "attn.to_add_out": ("txt_attn.proj", None),
        "ff.net.0.proj": ("img_mlp.0", None),
        "ff.net.2": ("img_mlp.2", None),
        "ff_context.net.0.proj": ("txt_mlp.0", None),
        "ff_context.net.2": ("txt_mlp.2", None),
        "norm1.linear": ("img_mod.lin", None),
        "norm1_context.linear": ("txt_mod.lin", None),
    },
    SINGLE: {
        "attn.to_q": ("linear1", "q"),
        "attn.to_k": ("linear1", "k"),
        "attn.to_v": ("linear1", "v"),
        "proj_mlp": ("linear1", "mlp"),
        "proj_out": ("linear2", None),
        "norm.linear": ("modulation.lin", None),
    },
}

PRESETS = {
    "attention": {DOUBLE: ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
                  SINGLE: ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]},
    "attention+mlp": {DOUBLE: ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
                      SINGLE: ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]},
}


@dataclass(frozen=True)
class FluxDims:
    """The sizes a layer selection is checked and sliced against."""

    hidden_size: int = 3072
    mlp_hidden: int = 12288
    double_blocks: int = 19
    single_blocks: int = 38

    def depth(self, blocks: str) -> int:
        return self.double_blocks if blocks == DOUBLE else self.single_blocks

    def shape(self, bfl_module: str) -> tuple[int, int]:
        """(in_features, out_features) of a BFL layer, from its name."""
        h, m = self.hidden_size, self.mlp_hidden
        leaf = bfl_module.split(".", 2)[-1]  # "double_blocks.3.img_attn.qkv" -> "img_attn.qkv"
        shapes = {"img_attn.qkv": (h, 3 * h), "txt_attn.qkv": (h, 3 * h),
                  "img_attn.proj": (h, h), "txt_attn.proj": (h, h),
                  "img_mlp.0": (h, m), "txt_mlp.0": (h, m), "img_mlp.2": (m, h), "txt_mlp.2": (m, h),
                  "img_mod.lin": (h, 6 * h), "txt_mod.lin": (h, 6 * h),
                  "linear1": (h, 3 * h + m), "linear2": (h + m, h), "modulation.lin": (h, 3 * h)}
        return shapes[leaf]

    def rows(self, part: str | None, out_features: int) -> tuple[int, int]:
        """Output rows [start, stop) of a slice of a fused layer."""
        h = self.hidden_size
        if part is None:
            return 0, out_features
        if part == "mlp":
            return 3 * h, 3 * h + self.mlp_hidden
        i = "qkv".index(part)
        return i * h, (i + 1) * h


@dataclass(frozen=True)
class LayerGroup:
    """One group of a selection: the same layer types, rank and alpha on a range of blocks.

    `end` is exclusive, as in mflux (`{"start": 0, "end": 38}` is all 38 single blocks).
    `alpha` defaults to the rank, so the LoRA's scale alpha/rank is 1.
    """

    blocks: str
    start: int
    end: int
    layer_types: tuple[str, ...]
    rank: int = 8
    alpha: float | None = None

    def __post_init__(self):
        if self.blocks not in LAYER_TYPES:
            raise ValueError(f"blocks is {self.blocks!r}; choose {DOUBLE!r} or {SINGLE!r}.")
        if not self.layer_types:
            raise ValueError(f"layer_types for {self.blocks} is empty; choose from: "
                             f"{', '.join(LAYER_TYPES[self.blocks])}.")
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES[self.blocks]]
        if unknown:
            raise ValueError(f"Unknown layer type {', '.join(map(repr, unknown))} for {self.blocks}; "
                             f"valid choices: {', '.join(LAYER_TYPES[self.blocks])}.")
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

    def check_depth(self, dims: FluxDims) -> None:
        depth = dims.depth(self.blocks)
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

    @property
    def block(self) -> str:
        """'double_blocks.3' / 'single_blocks.7': the block this target lives in."""
        return ".".join(self.bfl_module.split(".")[:2])


@dataclass(frozen=True)
class LayerSpec:
    """A whole selection: the groups, in order."""

    groups: tuple[LayerGroup, ...] = field(default_factory=tuple)

    def targets(self, dims: FluxDims) -> list[LoraTarget]:
        """Every LoRA this selection trains, checked against the model's depth."""
        seen: dict[str, int] = {}
        targets = []
        for gi, group in enumerate(self.groups):
            group.check_depth(dims)
            for block in range(group.start, group.end):
                for layer in group.layer_types:
                    name = f"{group.blocks}.{block}.{layer}"
                    if name in seen:
                        raise ValueError(f"{name} is selected by layer group {seen[name] + 1} and again by group "
                                         f"{gi + 1}; each layer can be in one group only.")
                    seen[name] = gi
                    module, part = LAYER_TYPES[group.blocks][layer]
                    bfl = f"{BFL_GROUP[group.blocks]}.{block}.{module}"
                    in_features, out_features = dims.shape(bfl)
                    targets.append(LoraTarget(name, bfl, part, group.rank, group.scale, in_features,
                                              out_features, dims.rows(part, out_features)))
        if not targets:
            raise ValueError("The LoRA layer selection is empty; add at least one layer group.")
        return targets

    def to_json(self) -> str:
        return json.dumps([asdict(g) for g in self.groups])

    @classmethod
    def from_json(cls, text: str) -> "LayerSpec":
        return cls(tuple(LayerGroup(**{**g, "layer_types": tuple(g["layer_types"])}) for g in json.loads(text)))

    @classmethod
    def from_mflux(cls, lora_layers: dict, source: str = "the config") -> "LayerSpec":
        """Read mflux's `lora_layers` block (seed 000's templates); errors name `source`."""
        groups = []
        for blocks, cfg in lora_layers.items():
            where = f"lora_layers.{blocks} in {source}"
            if blocks not in LAYER_TYPES:
                raise ValueError(f"lora_layers has {blocks!r} in {source}; valid keys: {DOUBLE!r}, {SINGLE!r}.")
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
    def preset(cls, name: str, dims: FluxDims, rank: int = 16, alpha: float | None = None) -> "LayerSpec":
        """A named selection on every block (used when no layer groups are given)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown layer preset {name!r}; choose from {', '.join(PRESETS)}.")
        layers = PRESETS[name]
        return cls((LayerGroup(DOUBLE, 0, dims.double_blocks, tuple(layers[DOUBLE]), rank, alpha),
                    LayerGroup(SINGLE, 0, dims.single_blocks, tuple(layers[SINGLE]), rank, alpha)))


def parse_layer_types(text: str, blocks: str) -> tuple[str, ...]:
    """'attn.to_q, attn.to_k proj_out' -> ('attn.to_q', 'attn.to_k', 'proj_out'); presets expand."""
    names = [t for t in text.replace(",", " ").split() if t]
    out: list[str] = []
    for name in names:
        expanded = PRESETS[name][blocks] if name in PRESETS else [name]
        out.extend(n for n in expanded if n not in out)
    return tuple(out)
