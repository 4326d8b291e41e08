"""FLUX.2 transformer files in BFL's layout (what ComfyUI's models/diffusion_models holds) and
diffusers' Flux2Transformer2DModel: the config read from a file's shapes, and the key conversion
both ways (diffusers' own converter reads BFL files; `to_bfl` writes them, for tests and tools)."""

from __future__ import annotations

import torch

from ..flux1.bfl import block_count, strip_prefix

RENAMES = {  # diffusers -> BFL, whole module names outside the blocks
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
          "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
          "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): BFL's and diffusers' order of the final modulation."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux2Transformer2DModel's state dict in BFL's names (fused q/k/v, `.scale` norms)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module, param = key.rsplit(".", 1)
        if module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(t)
        elif module in RENAMES:
            out[f"{RENAMES[module]}.{param}"] = t
        elif module.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            group, block, name = module.split(".", 2)
            double = group == "transformer_blocks"
            prefix = f"{'double' if double else 'single'}_blocks.{block}"
            norms, plain = (DOUBLE_NORMS, DOUBLE) if double else (SINGLE_NORMS, SINGLE)
            if name in norms:
                out[f"{prefix}.{norms[name]}.scale"] = t
            elif name in plain:
                out[f"{prefix}.{plain[name]}.{param}"] = t
            elif not any(name in parts for parts in QKV.values()):
                raise KeyError(f"{key}: no BFL name for it")
        else:
            raise KeyError(f"{key}: no BFL name for it")
    for key in state:
        if key.startswith("transformer_blocks.") and key.endswith("attn.to_q.weight"):
            block = key.split(".")[1]
            for fused, parts in QKV.items():
                out[f"double_blocks.{block}.{fused}.weight"] = torch.cat(
                    [state[f"transformer_blocks.{block}.{p}.weight"] for p in parts])
    return out


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL FLUX.2 state dict (any width, any prefix) in diffusers' names, by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(dict(strip_prefix(state)))


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Flux2Transformer2DModel's arguments for a BFL FLUX.2 file, from its shapes (the head width
    from the q/k norm, as ComfyUI's detection does; [klein] and [dev] alike)."""
    s = strip_prefix(shapes)
    q_norm = "double_blocks.0.img_attn.norm.query_norm"
    norm = s.get(f"{q_norm}.scale") or s[f"{q_norm}.weight"]
    hidden, head = s["img_in.weight"][0], norm[0]
    return {"patch_size": 1, "in_channels": s["img_in.weight"][1], "out_channels": s["final_layer.linear.weight"][0],
            "num_layers": block_count(s, "double_blocks"), "num_single_layers": block_count(s, "single_blocks"),
            "attention_head_dim": head, "num_attention_heads": hidden // head,
            "joint_attention_dim": s["txt_in.weight"][1], "timestep_guidance_channels": s["time_in.in_layer.weight"][1],
            "mlp_ratio": s["double_blocks.0.img_mlp.2.weight"][1] / hidden,
            "guidance_embeds": "guidance_in.in_layer.weight" in s}
