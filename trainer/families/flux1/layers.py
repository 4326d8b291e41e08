"""FLUX.1's layers: the names users pick (diffusers'), where each lives in ComfyUI's BFL layout,
and the sizes that come from the loaded model.

ComfyUI's FLUX (the original BFL layout) fuses some diffusers layers into one Linear: q/k/v in
double blocks, q/k/v/mlp-in in single blocks. Each diffusers name therefore maps to a BFL module
and, for fused ones, the slice of its output rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...lora.targets import LayerVocabulary

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"

# diffusers layer type -> (BFL module inside the block, slice of a fused output or None).
# Slices: "q", "k", "v" are hidden-size rows 0, 1, 2 of a fused qkv; "mlp" is what follows.
VOCABULARY = LayerVocabulary(
    groups={DOUBLE: "double_blocks", SINGLE: "single_blocks"},
    layers={
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
    },
    presets={
        "attention": {DOUBLE: ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
                      SINGLE: ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")},
        "attention+mlp": {DOUBLE: ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
                          SINGLE: ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")},
    },
)


# mflux's names (its own MLX FLUX.1 modules) where they differ from diffusers': its feed-forward
# layers are linear1/linear2 and its attention output a one-item list named to_out.
MFLUX_NAMES = {"attn.to_out": "attn.to_out.0", "ff.linear1": "ff.net.0.proj", "ff.linear2": "ff.net.2",
               "ff_context.linear1": "ff_context.net.0.proj", "ff_context.linear2": "ff_context.net.2"}


@dataclass(frozen=True)
class FluxDims:
    """The sizes of a loaded FLUX.1, which a layer selection is checked and sliced against."""

    hidden_size: int = 3072
    mlp_hidden: int = 12288
    double_blocks: int = 19
    single_blocks: int = 38

    vocabulary = VOCABULARY

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
