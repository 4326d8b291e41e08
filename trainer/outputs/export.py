"""LoRA files: kohya (`lora_unet_*`, what most tools read) or diffusers/PEFT naming.

kohya names follow BFL's layout, where q/k/v (single blocks: q/k/v/mlp) are one Linear. A fused
layer is written as one LoRA: the downs stacked, the ups block-diagonal with zeros in the rows of
slices not trained. ComfyUI scales a LoRA by alpha/rank of the file, so alpha is written to give
each part its own scale exactly. Every module gets `.alpha` (ComfyUI assumes 1.0 without it).

DoRA, LoKr and LoHa are written one module per target, named as SimpleTuner's LyCORIS files
(`lycoris_single_transformer_blocks_3_attn_to_q`): ComfyUI maps each onto its rows of the fused
layer (an offset into linear1 / qkv), so a slice never needs the other slices' weights. Their
tensors are LyCORIS's (variants.py: `lokr_w1`, `hada_w1_a`, `dora_scale`, …). The diffusers/PEFT
format holds LoRA and DoRA (`lora_magnitude_vector`) only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import __version__, families, files
from ..lora import text_encoder
from ..lora.targets import LayerSpec
from ..lora.text_encoder import T5XXL
from ..lora.weights import LoraSet, fused_up

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("kohya", "diffusers")


def kohya_state_dict(lora: LoraSet, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The transformer as `lora_unet_*`, CLIP-L as `lora_te1_text_model_encoder_layers_*`, T5-XXL as
    `lora_te3_encoder_block_*` (kohya's names; the stock Load LoRA applies them to MODEL and CLIP)."""
    sd = {}
    for module, weights in lora.by_module().items():
        for w in weights:
            if w.variant != "lora":
                key = "lycoris_" + w.target.name.replace(".", "_")
                sd.update({f"{key}.{name}": t.detach() for name, t in w.kohya_tensors().items()})
        weights = [w for w in weights if w.variant == "lora"]
        if not weights:
            continue
        key = text_encoder.kohya_key(weights[0].target.component, module)
        ref = weights[0].scale
        total_rank = sum(w.target.rank for w in weights)
        if len(weights) == 1 and weights[0].target.whole:
            up = weights[0].up
        else:
            up = fused_up(weights, scale_by=[w.scale / ref for w in weights])
        sd[f"{key}.lora_down.weight"] = torch.cat([w.down for w in weights]).detach()
        sd[f"{key}.lora_up.weight"] = up.detach()
        sd[f"{key}.alpha"] = torch.tensor(ref * total_rank)
    return _finish(sd, dtype)


def diffusers_state_dict(lora: LoraSet, dtype: torch.dtype = torch.float32,
                         family: str = "flux1") -> dict[str, torch.Tensor]:
    """PEFT names as diffusers' FluxPipeline.save_lora_weights writes them: `transformer.*`, and
    CLIP-L as `text_encoder.*` (its loader has no place for T5-XXL: save that in kohya format).
    FLUX.2 (Flux2LoraLoaderMixin): no `.alpha` keys (its loader refuses them and scales by 1), so
    each B carries its scale; slices of a layer diffusers fuses too (a single block's
    attn.to_qkv_mlp_proj) are written as that one layer, as the kohya file writes BFL's."""
    check_format("diffusers", {w.variant for w in lora})
    if T5XXL in lora.components():
        raise ValueError("This LoRA trained T5-XXL (text_encoder_t5), which diffusers' FLUX LoRA loader can't "
                         "load (it reads the transformer and CLIP-L only); save it in kohya format.")
    if family != "flux1":
        return _finish(_diffusers_fused(lora, families.family(family)), dtype)
    sd = {}
    for w in lora:
        prefix = text_encoder.DIFFUSERS_PREFIXES.get(w.target.component)
        key = f"{prefix}{text_encoder.path_of(w.target)}" if prefix else f"transformer.{w.target.name}"
        sd[f"{key}.lora_A.weight"] = w.down.detach()
        sd[f"{key}.lora_B.weight"] = w.up.detach()
        sd[f"{key}.alpha"] = torch.tensor(w.scale * w.target.rank)
        if w.variant == "dora":  # PEFT's m: it divides by ‖W + s·BA‖ itself
            sd[f"{key}.lora_magnitude_vector"] = w.magnitude.detach()
    return _finish(sd, dtype)


def _diffusers_module(target, vocabulary) -> str:
    """The diffusers module a target lives in: its own name, or the fused layer its rows are part of."""
    if target.part is None or target.name.count(".") < 2:
        return target.name
    group, block, _ = target.name.split(".", 2)
    whole = {module: name for name, (module, part) in vocabulary.layers[group].items() if part is None}
    fused = whole.get(target.bfl_module.split(".", 2)[2])
    return f"{group}.{block}.{fused}" if fused else target.name


def _diffusers_fused(lora: LoraSet, family) -> dict[str, torch.Tensor]:
    sd = {}
    for weights in lora.by_module().values():
        by_module: dict[str, list] = {}
        for w in weights:
            by_module.setdefault(_diffusers_module(w.target, family.vocabulary), []).append(w)
        for module, group in by_module.items():
            fused = len(group) > 1 or group[0].target.name != module
            if fused and any(w.variant == "dora" for w in group):
                raise ValueError(f"format is 'diffusers': {family.label}'s {module} is one layer in diffusers, and a "
                                 "DoRA on part of it can't be written there; save as kohya, or train the whole "
                                 "layer.")
            key = f"transformer.{module}"
            sd[f"{key}.lora_A.weight"] = torch.cat([w.down for w in group]).detach()
            sd[f"{key}.lora_B.weight"] = (fused_up(group) if fused else group[0].up * group[0].scale).detach()
            if group[0].variant == "dora":
                sd[f"{key}.lora_magnitude_vector"] = group[0].magnitude.detach()
    return sd


def check_format(fmt: str, variants: set[str]) -> None:
    """The file format can hold these variants (diffusers/PEFT: LoRA and DoRA only)."""
    other = sorted(variants - {"lora", "dora"})
    if fmt == "diffusers" and other:
        raise ValueError(f"format is 'diffusers', which holds LoRA and DoRA only (PEFT's lora_A/lora_B and "
                         f"lora_magnitude_vector); this LoRA is {', '.join(other)} (variant {other[0]!r}). Save it "
                         "as kohya: ComfyUI's LoraLoader, Forge and LyCORIS read it.")


def _finish(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".alpha"):
            out[k] = v.float()
            continue
        v = v.float().cpu()
        if dtype == torch.float16 and v.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"{k} has values beyond fp16's range; save with precision bf16 or fp32.")
        out[k] = v.to(dtype).contiguous()
    return out


def state_dict(lora: LoraSet, fmt: str = "kohya", dtype: torch.dtype = torch.float32,
               family: str = "flux1") -> dict[str, torch.Tensor]:
    if fmt not in FORMATS:
        raise ValueError(f"format is {fmt!r}; choose {' or '.join(FORMATS)}.")
    return kohya_state_dict(lora, dtype) if fmt == "kohya" else diffusers_state_dict(lora, dtype, family)


@dataclass(frozen=True)
class LoraMetadata:
    """What a LoRA file's header says about how it was trained."""

    spec: LayerSpec
    trigger_word: str | tuple[str, ...] = ""  # one subject's trigger word, or one per subject (Dataset.triggers)
    base_model: str = ""  # what it was trained on: the file the host loaded (flux1-krea-dev.safetensors)
    extra: dict[str, str] = field(default_factory=dict)  # resolution, learning rate, seed, run…
    family: str = "flux1"  # the model family's name (FluxBackend.family.name)
    variant: str = "dev"  # its architecture: "dev" (guidance-distilled: dev, Krea…) or "schnell"
    text_encoders: tuple[str, ...] = ()  # the text encoders it trains too ("clip_l", "t5xxl")

    @property
    def triggers(self) -> tuple[str, ...]:
        words = (self.trigger_word,) if isinstance(self.trigger_word, str) else tuple(self.trigger_word)
        return tuple(w.strip() for w in words if w.strip())

    def header(self, steps: int, fmt: str = "kohya") -> dict[str, str]:
        """Ours under `dreambooth.*`, plus the kohya/modelspec keys other UIs show. Several subjects:
        `dreambooth.trigger_words` lists them (JSON), `dreambooth.trigger_word` is the first one's,
        `modelspec.trigger_phrase` names each, comma-separated, as UIs show trigger phrases."""
        ranks = sorted({g.rank for g in self.spec.groups})
        alphas = sorted({g.alpha if g.alpha is not None else g.rank for g in self.spec.groups})
        md = {
            "dreambooth.version": __version__,
            "dreambooth.format": fmt,
            "dreambooth.trigger_word": next(iter(self.triggers), ""),
            "dreambooth.trigger_words": json.dumps(list(self.triggers)),
            "dreambooth.base_model": self.base_model,
            "dreambooth.family": self.family,
            "dreambooth.variant": self.variant,
            "dreambooth.rank": ",".join(map(str, ranks)),
            "dreambooth.alpha": ",".join(f"{a:g}" for a in alphas),
            "dreambooth.steps": str(steps),
            "dreambooth.layers": self.spec.to_json(),
            "ss_network_module": "networks.lora_flux",
            "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": f"{alphas[-1]:g}",
            "ss_base_model_version": self.family,
            "ss_sd_model_name": self.base_model,
            "ss_steps": str(steps),
            "modelspec.architecture": "-".join(filter(None, (families.family(self.family).modelspec, self.variant)))
                                      + "/lora",  # Chroma has one architecture: "chroma/lora"
            "modelspec.trigger_phrase": ", ".join(self.triggers),
            "dreambooth.text_encoders": ",".join(self.text_encoders),
            "ss_network_train_unet_only": str(not self.text_encoders),
        }
        md.update(self._network())
        md.update({f"dreambooth.{k}": str(v) for k, v in self.extra.items()})
        return md

    def _network(self) -> dict[str, str]:
        """The variant, ours and as kohya/LyCORIS headers name it (ss_network_args' algo)."""
        groups = self.spec.groups
        names = sorted({g.variant for g in groups})
        md = {"dreambooth.lora_variant": ",".join(names)}
        other = next((g for g in groups if g.variant != "lora"), None)
        if other is not None:
            lokr = {"algo": "lokr", "factor": str(other.lokr_factor), "full_matrix": str(other.lokr_full_rank)}
            args = {"lokr": lokr, "loha": {"algo": "loha"}, "dora": {"algo": "lora", "dora_wd": "True"}}[other.variant]
            md.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)})
        return md


class TrainedLora(dict):
    """A trained LoRA as it travels between ComfyUI nodes: a kohya state dict (so ComfyUI's own
    LORA_MODEL nodes accept it), plus the weights and metadata our nodes save it with. `kohya`:
    that state dict as already written (a checkpoint's file), else made from `lora` now (DoRA's
    dora_scale needs the model it trained in)."""

    def __init__(self, lora: LoraSet, meta: dict[str, str], kohya: dict[str, torch.Tensor] | None = None):
        super().__init__(kohya if kohya is not None else kohya_state_dict(lora))
        self.lora = lora
        self.metadata = meta

    def to_file_dict(self, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if fmt == "kohya":
            return _finish(dict(self), dtype)
        return state_dict(self.lora, fmt, dtype, self.metadata.get("dreambooth.family", "flux1"))


def read_metadata(path: str | Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return header.get("__metadata__", {})


def load(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_numbered(root: str | Path, prefix: str, sd: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write `root/prefix_00001.safetensors` (the next free number, so nothing is overwritten). The
    prefix is checked like every name the pack writes: it can't leave `root` (files.safe_path)."""
    files.safe_path(root, prefix)
    counter = 1
    while (path := files.safe_path(root, f"{prefix.strip()}_{counter:05}.safetensors")).exists():
        counter += 1
    return files.write_safetensors(path, sd, meta)
