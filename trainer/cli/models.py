"""`train --model`: which FLUX the command line trains on, from local files only.

    --model tiny                                the embedded tiny FLUX (random weights)
    --model tiny --family flux2                 the embedded tiny FLUX.2 [klein]
    --model flux1-dev.safetensors --models-dir ~/ComfyUI/models
                                                names resolve as ComfyUI's stock loaders find them:
                                                diffusion_models/ and unet/, text_encoders/ and clip/, vae/
    --model PATH.safetensors --clip-l … --t5 … --vae …
    --model DIFFUSERS_FOLDER                    transformer/, text_encoder/, text_encoder_2/, vae/, tokenizer*/
    --model flux-2-klein-4b.safetensors --text-encoder qwen_3_4b.safetensors --vae flux2-vae.safetensors
                                                FLUX.2, told apart by its keys (double_stream_modulation_img)

Every file is checked from its header (weights.py) before anything is loaded or written. With
ComfyUI importable (COMFYUI_PATH, or installed) single files load through ComfyUI's own loaders,
so the model is exactly the one the nodes train (comfy_models.py); otherwise through diffusers and
transformers (diffusers_models.py; FLUX.2: flux2_models.py, always, for now).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families.flux1.tiny import ByteTokenizer
from ..log import logger
from ..recipe.fields import RecipeError
from . import weights
from .weights import CLIP_L, EXPECTED, FLUX2, FLUX2_VAE, MODEL_KINDS, QWEN3, T5, TRANSFORMER, VAE, Weights

log = logger(__name__)

TINY = "tiny"
TEXT_ENCODER = "text_encoder"  # FLUX.2 [klein]'s Qwen3 (the role; its kind is weights.QWEN3)
FOLDERS = {TRANSFORMER: ("diffusion_models", "unet"), CLIP_L: ("text_encoders", "clip"),
           T5: ("text_encoders", "clip"), TEXT_ENCODER: ("text_encoders", "clip"), VAE: ("vae",)}
PARTS = {"flux1": {CLIP_L: CLIP_L, T5: T5, VAE: VAE},  # family -> the files beside its transformer: role -> kind
         "flux2": {TEXT_ENCODER: QWEN3, VAE: FLUX2_VAE}}
DEFAULT_NAMES = {CLIP_L: ("clip_l.safetensors",), VAE: ("ae.safetensors",), QWEN3: ("qwen_3_4b.safetensors",),
                 FLUX2_VAE: ("flux2-vae.safetensors",),
                 T5: ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors")}
FLAGS = {TRANSFORMER: "--model", CLIP_L: "--clip-l", T5: "--t5", TEXT_ENCODER: "--text-encoder", VAE: "--vae"}
SUBFOLDERS = {TRANSFORMER: "transformer", CLIP_L: "text_encoder", T5: "text_encoder_2", VAE: "vae"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(p) -> None:
    p.add_argument("--family", choices=("auto", "flux1", "flux2"), default="auto",
                   help="the model family: flux1 (FLUX.1 dev/schnell) or flux2 (FLUX.2 [klein]/[dev]). auto: read "
                        "from the --model file's keys; with --model tiny, flux1 (--family flux2 for the tiny FLUX.2)")
    p.add_argument("--models-dir", type=Path, metavar="DIR",
                   help="a ComfyUI models folder: --model, --clip-l, --t5, --text-encoder and --vae names are looked "
                        "up in its diffusion_models/ and unet/, text_encoders/ and clip/, and vae/ folders, as "
                        "ComfyUI's loaders do (defaults clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors; "
                        "for FLUX.2 qwen_3_4b.safetensors, flux2-vae.safetensors)")
    p.add_argument("--clip-l", metavar="FILE", help="the CLIP-L text encoder (clip_l.safetensors): a path or a name "
                                                     "in --models-dir")
    p.add_argument("--t5", metavar="FILE", help="the T5-XXL text encoder (t5xxl_fp16.safetensors or an fp8 one)")
    p.add_argument("--text-encoder", metavar="FILE",
                   help="FLUX.2 [klein]'s Qwen3 text encoder (qwen_3_4b.safetensors; qwen_3_8b for klein 9B)")
    p.add_argument("--vae", metavar="FILE", help="the VAE: FLUX.1's (ae.safetensors) or FLUX.2's "
                                                 "(flux2-vae.safetensors)")
    p.add_argument("--tokenizers", type=Path, metavar="DIR",
                   help="without ComfyUI: a folder with tokenizer/ (CLIP-L; FLUX.2: Qwen3's) and tokenizer_2/ (T5), "
                        "as a diffusers FLUX.1 or FLUX.2 [klein] folder has; ComfyUI ships its own")
    p.add_argument("--loader", choices=("auto", "comfyui", "diffusers"), default="auto",
                   help="load single files through ComfyUI's loaders (the model the nodes train; needs COMFYUI_PATH "
                        "or an installed ComfyUI) or diffusers'; auto: ComfyUI when it is importable (FLUX.2: "
                        "diffusers)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="the weights' dtype for the diffusers loader (auto: bf16 on a GPU, fp32 on the CPU); fp8 "
                        "files are widened to it")


@dataclass(frozen=True)
class Plan:
    """The checked files of a run's model, nothing loaded yet."""

    loader: str  # "tiny", "comfyui" or "diffusers"
    parts: dict[str, Weights]  # TRANSFORMER and the roles of PARTS[family] -> its single file
    folder: Path | None = None  # a diffusers folder, for the parts not given as files
    tokenizers: Path | None = None
    dtype: str = "auto"
    family: str = "flux1"

    @property
    def name(self) -> str:
        t = self.parts.get(TRANSFORMER)
        return t.path.name if t else self.folder.name if self.folder else TINY


def comfyui_importable() -> bool:
    return bool(os.environ.get("COMFYUI_PATH")) or importlib.util.find_spec("comfy") is not None


def _find(value: str, role: str, kind: str, models_dir: Path | None) -> Path:
    given = Path(value).expanduser()
    if given.exists() or models_dir is None:
        return given
    tried = [models_dir / sub / value for sub in FOLDERS[role]]
    found = next((p for p in tried if p.exists()), None)
    if found is None:
        raise RecipeError(f"{FLAGS[role]} {value}: not a file, nor in {', '.join(str(p.parent) for p in tried)}. "
                          f"Expected {EXPECTED[kind]}.")
    return found


def _default(role: str, kind: str, models_dir: Path) -> Path | None:
    for name in DEFAULT_NAMES[kind]:
        for sub in FOLDERS[role]:
            if (models_dir / sub / name).is_file():
                return models_dir / sub / name
    return None


def _check_folder(folder: Path) -> None:
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        raise RecipeError(f"--model {folder}: a folder without transformer/config.json; expected a diffusers FLUX.1 "
                          "folder (transformer/, text_encoder/, text_encoder_2/, vae/, tokenizer/, tokenizer_2/).")
    cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if cls == "Flux2Transformer2DModel":
        raise RecipeError(f"--model {folder}: a diffusers FLUX.2 folder, which the command line does not read yet; "
                          "give its single files: --model (transformer), --text-encoder (Qwen3) and --vae.")
    if cls != "FluxTransformer2DModel":
        raise RecipeError(f"--model {folder}: its transformer is a {cls}; expected FLUX.1's FluxTransformer2DModel.")


def _tiny(args) -> Plan:
    given = [f for f, v in _extra(args).items() if v]
    if given:
        raise RecipeError(f"--model tiny is the embedded tiny FLUX; {', '.join(given)} are for FLUX files. Drop "
                          "them, or give --model a FLUX.1 or FLUX.2 file or a diffusers FLUX.1 folder.")
    return Plan(TINY, {}, family="flux1" if args.family == "auto" else args.family)


def _extra(args) -> dict:
    return {f: getattr(args, a, None) for f, a in (("--clip-l", "clip_l"), ("--t5", "t5"), ("--vae", "vae"),
                                                   ("--text-encoder", "text_encoder"), ("--models-dir", "models_dir"),
                                                   ("--tokenizers", "tokenizers"))}


def plan(args) -> Plan:
    """Every file of `--model` and the flags beside it found and checked, before anything is loaded."""
    args.family = getattr(args, "family", "auto")
    if args.model == TINY:
        return _tiny(args)
    models_dir = args.models_dir.expanduser() if args.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        raise RecipeError(f"--models-dir {models_dir}: not a folder; give ComfyUI's models folder (ComfyUI/models).")
    where = _find(args.model, TRANSFORMER, TRANSFORMER, models_dir)
    if not where.exists():
        raise RecipeError(f"--model {args.model!r}: not 'tiny' (the embedded tiny FLUX), nor a file or folder; give a "
                          "FLUX.1 or FLUX.2 transformer file (add --models-dir to find it by name) or a diffusers "
                          "FLUX.1 folder.")
    folder = where if where.is_dir() else None
    if folder is not None:
        _check_folder(folder)
    kinds = {"auto": (TRANSFORMER, FLUX2), "flux1": (TRANSFORMER,), "flux2": (FLUX2,)}[args.family]
    parts = {} if folder else {TRANSFORMER: weights.inspect(where, "--model", kinds)}
    family = MODEL_KINDS[parts[TRANSFORMER].kind] if parts else "flux1"
    wrong = [FLAGS[r] for r in FLAGS if r != TRANSFORMER and r not in PARTS[family] and getattr(args, r, None)]
    if wrong:
        label = {"flux1": "FLUX.1", "flux2": "FLUX.2"}[family]
        raise RecipeError(f"--model {where} is {label}, which does not read {', '.join(wrong)}; {label} takes "
                          f"{', '.join(FLAGS[r] for r in PARTS[family])}.")
    for role, kind in PARTS[family].items():
        value = getattr(args, role, None)
        path = _find(value, role, kind, models_dir) if value else \
            _default(role, kind, models_dir) if models_dir and folder is None else None  # a folder has its own
        if path is not None:
            parts[role] = weights.inspect(path, FLAGS[role], kind)
        elif folder is None:
            raise RecipeError(f"{FLAGS[role]} is needed with a single-file transformer: {EXPECTED[kind]}; or give "
                              "--models-dir (ComfyUI's models folder) to find it by its usual name.")
    loader = args.loader
    if loader == "auto":
        loader = "comfyui" if folder is None and family == "flux1" and comfyui_importable() else "diffusers"
    if loader == "comfyui" and family == "flux2":
        raise RecipeError("--loader comfyui: FLUX.2 files load through diffusers on the command line for now; drop "
                          "--loader, or train FLUX.2 in ComfyUI with the nodes.")
    if loader == "comfyui" and folder is not None:
        raise RecipeError(f"--model {folder} is a diffusers folder, which loads through diffusers: drop --loader "
                          "comfyui, or give the single files.")
    if loader == "comfyui" and not comfyui_importable():
        raise RecipeError("--loader comfyui: ComfyUI can't be imported; set COMFYUI_PATH to a ComfyUI checkout.")
    tokenizers = args.tokenizers.expanduser() if args.tokenizers else \
        folder if folder is not None and (folder / "tokenizer").is_dir() else None
    if loader == "diffusers" and tokenizers is None and _text_vocab(parts, folder) != ByteTokenizer.VOCAB:
        needs = "tokenizer/ (Qwen3's, as a diffusers FLUX.2 [klein] folder has)" if family == "flux2" else \
            "tokenizer/ and tokenizer_2/, as a diffusers FLUX.1 folder has"
        raise RecipeError(f"The text encoders need their tokenizers: give --tokenizers DIR (a folder with {needs}), "
                          "or set COMFYUI_PATH to load FLUX.1 through ComfyUI, which ships them.")
    return Plan(loader, parts, folder, tokenizers, args.dtype, family)


def _text_vocab(parts: dict[str, Weights], folder: Path | None) -> int:
    if TEXT_ENCODER in parts:
        shapes = parts[TEXT_ENCODER].shapes
        return (shapes.get("model.embed_tokens.weight") or shapes["embed_tokens.weight"])[0]
    if CLIP_L in parts:
        return parts[CLIP_L].shapes["text_model.embeddings.token_embedding.weight"][0]
    config = folder / SUBFOLDERS[CLIP_L] / "config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("vocab_size", 0) if config.is_file() else 0


def device_and_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, auto = torch.device("cpu"), torch.float32
    return device, DTYPES.get(name, auto)


def load(p: Plan):
    """The model of a plan (not the tiny one: train.py's), with the tiny set's interface."""
    if p.loader == "comfyui":
        from . import comfy_models  # imports ComfyUI: only here

        return comfy_models.load(p)
    return load_diffusers(p)


def load_diffusers(p: Plan):
    if p.family == "flux2":
        from . import flux2_models

        return flux2_models.load(p, *device_and_dtype(p.dtype))
    from . import diffusers_models as dm

    device, dtype = device_and_dtype(p.dtype)
    loaders = {TRANSFORMER: dm.transformer, CLIP_L: dm.clip_l, T5: dm.t5, VAE: dm.vae}
    models = {}
    for part, load_file in loaders.items():
        log.info("Loading %s from %s.", part, p.parts[part].path if part in p.parts else p.folder / SUBFOLDERS[part])
        models[part] = load_file(p.parts[part], dtype) if part in p.parts else _from_folder(p.folder, part, dtype)
        models[part].to(device).eval().requires_grad_(False)
    try:
        clip_tokens, t5_tokens = dm.tokenizers(p.tokenizers)
    except FileNotFoundError as e:
        raise RecipeError(str(e)) from None
    return dm.LoadedFlux(models[TRANSFORMER], models[VAE], models[CLIP_L], models[T5], seed=0, label=p.name,
                         clip_tokens=clip_tokens, t5_tokens=t5_tokens)


def _from_folder(folder: Path, part: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    cls = {TRANSFORMER: FluxTransformer2DModel, CLIP_L: CLIPTextModel, T5: T5EncoderModel, VAE: AutoencoderKL}[part]
    where = folder / SUBFOLDERS[part]
    if not (where / "config.json").is_file():
        raise RecipeError(f"--model {folder}: no {SUBFOLDERS[part]}/config.json; give {FLAGS[part]} FILE "
                          f"({EXPECTED[part]}), or a complete diffusers FLUX.1 folder.")
    dtype_arg = {"torch_dtype": dtype} if part in (TRANSFORMER, VAE) else {"dtype": dtype}
    return cls.from_pretrained(str(where), local_files_only=True, **dtype_arg)
