"""FLUX.2's layers: diffusers' `Flux2Transformer2DModel` names, where each lives in ComfyUI's BFL
layout, and the sizes read from the loaded model.

FLUX.2's blocks have no modulation of their own (it is shared, at model level) and no biases. Its
MLPs are SwiGLU: `img_mlp.0` (diffusers' `ff.linear_in`) holds the gate rows then the up rows,
2·mlp_hidden in all. A single block's `linear1` (diffusers' `attn.to_qkv_mlp_proj`) is
q | k | v | gate | up: 3·hidden + 2·mlp_hidden rows, and `linear2` (`attn.to_out`) reads
attention | MLP. diffusers fuses the single block as BFL does; the slices of it are named as
FLUX.1's (attn.to_q, attn.to_k, attn.to_v, proj_mlp) so that the presets mean the same rows in
both families. The shared modulation (`double_stream_modulation_img.linear` and `_txt`, hidden → 6·hidden;
`single_stream_modulation.linear`, hidden → 3·hidden) is the group "modulation", block_range 0…1, in
no preset: every block's shift, scale and gate come from it, so a LoRA there changes them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...lora.targets import LayerVocabulary
from ..flux1.layers import DOUBLE, SINGLE

ATTENTION_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
MLP_DOUBLE = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")

MODULATION = "modulation"  # the model-level layers every block's shift/scale/gate comes from
MODULATION_LAYERS = {"double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
                     "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
                     "single_stream_modulation.linear": "single_stream_modulation.lin"}

VOCABULARY = LayerVocabulary(
    groups={DOUBLE: "double_blocks", SINGLE: "single_blocks", MODULATION: ""},
    layers={
        MODULATION: {name: (bfl, None) for name, bfl in MODULATION_LAYERS.items()},
        DOUBLE: {
            "attn.to_q": ("img_attn.qkv", "q"),
            "attn.to_k": ("img_attn.qkv", "k"),
            "attn.to_v": ("img_attn.qkv", "v"),
            "attn.to_out.0": ("img_attn.proj", None),
            "attn.add_q_proj": ("txt_attn.qkv", "q"),
            "attn.add_k_proj": ("txt_attn.qkv", "k"),
            "attn.add_v_proj": ("txt_attn.qkv", "v"),
            "attn.to_add_out": ("txt_attn.proj", None),
            "ff.linear_in": ("img_mlp.0", None),
            "ff.linear_out": ("img_mlp.2", None),
            "ff_context.linear_in": ("txt_mlp.0", None),
            "ff_context.linear_out": ("txt_mlp.2", None),
        },
        SINGLE: {
            "attn.to_qkv_mlp_proj": ("linear1", None),
            "attn.to_q": ("linear1", "q"),
            "attn.to_k": ("linear1", "k"),
            "attn.to_v": ("linear1", "v"),
            "proj_mlp": ("linear1", "mlp"),
            "attn.to_out": ("linear2", None),
        },
    },
    presets={
        "attention": {DOUBLE: ATTENTION_DOUBLE, SINGLE: ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out")},
        "attention+mlp": {DOUBLE: ATTENTION_DOUBLE + MLP_DOUBLE,
                          SINGLE: ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "attn.to_out")},
    },
)


@dataclass(frozen=True)
class Flux2Dims:
    """The sizes of a loaded FLUX.2 (defaults: [klein] 4B), which a layer selection is checked and
    sliced against. `mlp_hidden` is the MLP's inner width (3·hidden): its first layer has twice
    that many rows (gate and up)."""

    hidden_size: int = 3072
    mlp_hidden: int = 9216
    double_blocks: int = 5
    single_blocks: int = 20

    vocabulary = VOCABULARY

    def depth(self, blocks: str) -> int:
        return {DOUBLE: self.double_blocks, SINGLE: self.single_blocks}.get(blocks, 1)  # modulation: model-level

    def shape(self, bfl_module: str) -> tuple[int, int]:
        """(in_features, out_features) of a BFL layer, from its name."""
        h, m = self.hidden_size, self.mlp_hidden
        leaf = bfl_module.split(".", 2)[-1]
        shapes = {"double_stream_modulation_img.lin": (h, 6 * h), "double_stream_modulation_txt.lin": (h, 6 * h),
                  "single_stream_modulation.lin": (h, 3 * h),"img_attn.qkv": (h, 3 * h), "txt_attn.qkv": (h, 3 * h),
                  "img_attn.proj": (h, h), "txt_attn.proj": (h, h),
                  "img_mlp.0": (h, 2 * m), "txt_mlp.0": (h, 2 * m), "img_mlp.2": (m, h), "txt_mlp.2": (m, h),
                  "linear1": (h, 3 * h + 2 * m), "linear2": (h + m, h)}
        return shapes.get(bfl_module) or shapes[leaf]

    def rows(self, part: str | None, out_features: int) -> tuple[int, int]:
        """Output rows [start, stop) of a slice of a fused layer: the MLP slice of linear1 is its
        gate and up rows, 2·mlp_hidden (FLUX.1's is mlp_hidden)."""
        h = self.hidden_size
        if part is None:
            return 0, out_features
        if part == "mlp":
            return 3 * h, 3 * h + 2 * self.mlp_hidden
        i = "qkv".index(part)
        return i * h, (i + 1) * h
