"""FLUX.1 transformer weights in BFL's layout (the single files of `models/diffusion_models`, what
ComfyUI loads) and in diffusers' (FluxTransformer2DModel), both ways, from one table.

The block layers come from layers.py's vocabulary (each diffusers layer's BFL module and slice of
a fused q/k/v/mlp output); the rest (embedders, q/k norms, the final layer) is listed here. Works at
any width: the sizes are read from the weights, not assumed to be FLUX.1's 3072.
"""

from __future__ import annotations

import re

import torch

from .layers import DOUBLE, SINGLE, VOCABULARY

BFL_PREFIX = "model.diffusion_model."  # full checkpoints (and some single files) nest the transformer here
PARTS = ("q", "k", "v", "mlp")  # the order of a fused output's slices

# diffusers module -> BFL module, outside the blocks (each has .weight and .bias)
OUTER = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (shift, scale) in BFL, (scale, shift) in diffusers
}
SWAPPED = "norm_out.linear"
# diffusers q/k RMSNorm weights -> BFL scales, per block kind
NORMS = {
    DOUBLE: {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
             "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
             "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
             "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"},
    SINGLE: {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"},
}


def strip_prefix(state: dict) -> dict:
    if any(k.startswith(BFL_PREFIX) for k in state):
        return {k[len(BFL_PREFIX):]: v for k, v in state.items() if k.startswith(BFL_PREFIX)}
    return state


def canonical(state: dict) -> dict:
    """BFL keys as BFL's files name them: no checkpoint prefix, q/k norms as `.scale` (newer ComfyUI's
    own FLUX names them `.weight`, and saves them so)."""
    return {re.sub(r"(query_norm|key_norm)\.weight$", r"\1.scale", k): v for k, v in strip_prefix(state).items()}


def block_count(keys, group: str) -> int:
    return 1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"{group}.")), default=-1)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _fused(kind: str) -> dict[str, list[tuple[str, str]]]:
    """BFL module -> [(diffusers layer, part)] in output-row order, for the fused layers of a block kind."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, (module, part) in VOCABULARY.layers[kind].items():
        if part is not None:
            out.setdefault(module, []).append((name, part))
    return {m: sorted(parts, key=lambda p: PARTS.index(p[1])) for m, parts in out.items()}


def to_diffusers(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL state dict as FluxTransformer2DModel's (the tensors are views or copies, dtypes kept)."""
    bfl = canonical(bfl)
    out = {}
    for d, b in OUTER.items():
        for leaf in ("weight", "bias"):
            if f"{b}.{leaf}" in bfl:
                t = bfl[f"{b}.{leaf}"]
                out[f"{d}.{leaf}"] = _swap_halves(t) if d == SWAPPED else t
    hidden = bfl["img_in.weight"].shape[0]
    for kind, group in VOCABULARY.groups.items():
        fused = _fused(kind)
        for i in range(block_count(bfl, group)):
            src, dst = f"{group}.{i}.", f"{kind}.{i}."
            for name, (module, part) in VOCABULARY.layers[kind].items():
                if part is None:
                    for leaf in ("weight", "bias"):
                        out[f"{dst}{name}.{leaf}"] = bfl[f"{src}{module}.{leaf}"]
            for module, parts in fused.items():
                for leaf in ("weight", "bias"):
                    whole = bfl[f"{src}{module}.{leaf}"]
                    sizes = [hidden] * 3 + ([whole.shape[0] - 3 * hidden] if len(parts) == 4 else [])
                    for (name, _), piece in zip(parts, whole.split(sizes, dim=0)):
                        out[f"{dst}{name}.{leaf}"] = piece
            for d, b in NORMS[kind].items():
                out[f"{dst}{d}"] = bfl[f"{src}{b}"]
    return out


def to_bfl(diffusers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's state dict in BFL's layout (the inverse of `to_diffusers`)."""
    out = {}
    for d, b in OUTER.items():
        for leaf in ("weight", "bias"):
            if f"{d}.{leaf}" in diffusers:
                t = diffusers[f"{d}.{leaf}"]
                out[f"{b}.{leaf}"] = _swap_halves(t) if d == SWAPPED else t
    for kind, group in VOCABULARY.groups.items():
        fused = _fused(kind)
        for i in range(block_count(diffusers, kind)):
            src, dst = f"{kind}.{i}.", f"{group}.{i}."
            for name, (module, part) in VOCABULARY.layers[kind].items():
                if part is None:
                    for leaf in ("weight", "bias"):
                        out[f"{dst}{module}.{leaf}"] = diffusers[f"{src}{name}.{leaf}"]
            for module, parts in fused.items():
                for leaf in ("weight", "bias"):
                    out[f"{dst}{module}.{leaf}"] = torch.cat([diffusers[f"{src}{name}.{leaf}"] for name, _ in parts])
            for d, b in NORMS[kind].items():
                out[f"{dst}{b}"] = diffusers[f"{src}{d}"]
    return out


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """FluxTransformer2DModel's arguments, read from a BFL file's shapes. The RoPE axes are FLUX.1's
    (16, 56, 56), so the attention heads must be 128 wide, as FLUX.1's are."""
    shapes = canonical(shapes)
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != 128:
        raise ValueError(f"attention heads {head_dim} wide; FLUX.1's are 128 wide (RoPE axes 16, 56, 56)")
    return {"patch_size": 1, "in_channels": in_channels, "num_layers": block_count(shapes, "double_blocks"),
            "num_single_layers": block_count(shapes, "single_blocks"), "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim, "joint_attention_dim": shapes["txt_in.weight"][1],
            "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in shapes, "axes_dims_rope": (16, 56, 56)}
