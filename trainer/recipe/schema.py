"""Our own recipe format: a training recipe as five small sections, each a dataclass whose fields
are the keys (`dataset.trigger`, `train.steps`, …). `train` is the library's TrainConfig itself,
so every field it has is a key here."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..data.datasets import CAPTION_SOURCES, PROBLEMS
from ..loop.config import TrainConfig
from ..lora.variants import VARIANTS
from ..outputs.export import FORMATS, SAVE_DTYPES
from ..outputs.scores import DEFAULT_MAX_DRIFT
from . import fields
from .fields import Key, Reader, RecipeError, check


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text}, **kw}


@dataclass
class DatasetSection:
    folders: list[str] = field(**_help(
        "Folder(s) of photos with same-name .txt captions (or a metadata file), relative to this file; "
        "`~` is your home. ai-toolkit's folder_path, SimpleTuner's instance_data_dir. An mflux train config "
        "(.json) stands for the photos and prompts of its examples block.", default_factory=list))
    trigger: str = field(default="sks", **_help(
        "A rare word that will mean your subject ('sks', 'ohwx'): put into every caption."))
    class_word: str = field(default="", **_help("What the subject is ('person', 'dog'); kept when captions drop out."))
    captions: str = field(default="auto", **_help(
        "Where captions come from: auto (.txt, else metadata file), txt, metadata, filename."))
    default_caption: str = field(default="", **_help(
        "Caption for photos without one (ai-toolkit's default_caption); empty: a missing caption is an error."))
    caption_dropout: float = field(default=0.0, **_help(
        "How often a step sees only the trigger and class (ai-toolkit's caption_dropout_rate; 0.05–0.25)."))
    shuffle_tags: bool = field(default=False, **_help(
        "Shuffle the comma-separated tags after the first each time (ai-toolkit's shuffle_tokens, kohya's "
        "shuffle_caption)."))
    repeats: int = field(default=1, **_help(
        "How often each photo appears per epoch (kohya's repeats; SimpleTuner's repeats + 1)."))
    resolution: list[int] = field(default_factory=lambda: [512], **_help(
        "Training size(s) in pixels (bucket area ≈ size²): 512 learns likeness fast, 1024 detail. Several, "
        "e.g. [512, 1024], train each photo at each."))
    bucketing: bool = field(default=True, **_help("Keep each photo's aspect ratio (buckets 1:4 to 4:1)."))
    crop: str = field(default="center", **_help("Where to crop what doesn't fit the bucket: center or random."))
    minimum_image_size: int = field(default=0, **_help(
        "Shorter side a photo needs, in px (SimpleTuner's minimum_image_size); 0: half the resolution."))
    maximum_image_size: int = field(default=0, **_help(
        "Photos larger than this (√(w·h), px) are downsampled to target_downsample_size, then cropped "
        "(SimpleTuner's maximum_image_size); 0: off."))
    target_downsample_size: int = field(default=0, **_help(
        "What photos above maximum_image_size are downsampled to (SimpleTuner's); 0: the resolution."))
    caption_ext: str = field(default="txt", **_help("The captions' file extension (ai-toolkit's caption_ext): txt, "
                                                    "caption."))
    flip: bool = field(default=False, **_help("Mirror half the views (objects, styles; not faces)."))
    concepts: bool = field(default=False, **_help(
        "Each subfolder is a subject named like kohya's '10_sks dog' (repeats, trigger, class)."))
    problems: str = field(default="stop", **_help(
        "stop: any unreadable photo or missing caption is an error listing them all; skip: train on the rest."))
    control_path: list[str] = field(default_factory=list, **_help(
        "For an edit LoRA (FLUX.1 Kontext): one folder of source images per folder in `folders`, in the same "
        "order, each image named as its photo after the edit (ai-toolkit's control_path); relative to this "
        "file. Empty: a plain LoRA."))
    regularisation: list[str] = field(default_factory=list, **_help(
        "Folder(s) of generic class photos (ai-toolkit's is_reg sets, DreamBooth's class_data_dir). They never "
        "carry the trigger; photos without a caption get the class word."))
    network_weight: float = field(default=1.0, **_help(
        "The LoRA's multiplier while training on the subject's photos (ai-toolkit's per-dataset network_weight; "
        "1 as usual)."))
    regularisation_network_weight: float = field(default=1.0, **_help(
        "The LoRA's multiplier while training on the regularisation photos (ai-toolkit's network_weight of an "
        "is_reg set; 1 as usual, 0 trains them through the frozen model only)."))
    regularisation_weight: float = field(default=1.0, **_help(
        "Loss weight of the regularisation photos (DreamBooth's prior_loss_weight; 1.0 usual)."))
    regularisation_caption: str = field(default="", **_help(
        "Caption of the regularisation photos without one (DreamBooth's class_prompt, 'a photo of a dog'); "
        "empty: default_caption, else the class word."))

    def __post_init__(self):
        check("dataset", [
            (self.captions in CAPTION_SOURCES, f"captions is {self.captions!r}; choose {', '.join(CAPTION_SOURCES)}."),
            (0 <= self.caption_dropout < 1, f"caption_dropout is {self.caption_dropout}; use 0–0.9 (0.05–0.25)."),
            (self.repeats >= 1, f"repeats is {self.repeats}; it must be at least 1."),
            (bool(self.resolution) and all(r >= 64 and r % 16 == 0 for r in self.resolution),
             f"resolution is {self.resolution}; give sizes that are multiples of 16, at least 64 (512, 1024)."),
            (self.crop in ("center", "random"), f"crop is {self.crop!r}; choose center or random."),
            (self.problems in PROBLEMS, f"problems is {self.problems!r}; choose stop or skip."),
            (self.regularisation_weight >= 0, f"regularisation_weight is {self.regularisation_weight}; use 0 or more."),
            (all(math.isfinite(w) for w in (self.network_weight, self.regularisation_network_weight)),
             f"network_weight / regularisation_network_weight are {self.network_weight} / "
             f"{self.regularisation_network_weight}; use finite multipliers (1 as usual)."),
            (min(self.minimum_image_size, self.maximum_image_size, self.target_downsample_size) >= 0,
             "minimum_image_size, maximum_image_size and target_downsample_size are pixels: use 0 or more."),
            (not self.maximum_image_size or self.target_downsample_size <= self.maximum_image_size,
             f"target_downsample_size {self.target_downsample_size} is above maximum_image_size "
             f"{self.maximum_image_size}; photos above the maximum are downsampled to the target (e.g. 1536, 1024)."),
            (bool(re.fullmatch(r"\.?[A-Za-z0-9_]+", self.caption_ext)),
             f"caption_ext is {self.caption_ext!r}; give an extension like txt or caption."),
            (not self.control_path or len(self.control_path) == len(self.folders),
             f"control_path names {len(self.control_path)} folder(s) for {len(self.folders)} in folders; give one "
             "control folder per dataset folder, in the same order (or none for a plain LoRA)."),
        ])


@dataclass
class LayerGroupSection:
    blocks: str = field(default="single_transformer_blocks", **_help(
        "transformer_blocks (double) or single_transformer_blocks (mflux's lora_layers keys); FLUX.2 also "
        "modulation (its shared modulation layers, start 0, end 1)."))
    start: int = field(default=0, **_help("First block (block_range.start)."))
    end: int = field(default=0, **_help("End block, exclusive (block_range.end); 0: the last block."))
    layer_types: list[str] = field(default_factory=list, **_help("diffusers layer names or preset names."))
    rank: int = field(default=16, **_help("LoRA rank of this group (mflux's lora_rank)."))
    alpha: float = field(default=0.0, **_help("LoRA alpha of this group; 0: alpha = rank."))
    variant: str = field(default="", **_help(
        "What this group trains (lora, dora, lokr, loha; LyCORIS's module_algo_map / name_algo_map algo); "
        "empty: layers.variant."))
    lokr_factor: int | None = field(default=None, **_help(
        "LoKr: this group's own Kronecker factor (-1 automatic, 4–16; LyCORIS's per-module factor); empty: "
        "layers.lokr_factor."))
    lokr_full_rank: bool | None = field(default=None, **_help(
        "LoKr: whether this group trains the large factor whole (LyCORIS's per-module full_matrix); empty: "
        "layers.lokr_full_rank."))

    def __post_init__(self):
        check("layers.groups[]", [(self.rank >= 1, f"rank is {self.rank}; it must be at least 1."),
                                  (bool(self.layer_types), "layer_types is empty; name the layers, e.g. [proj_out]."),
                                  (self.alpha >= 0, f"alpha is {self.alpha}; use 0 (= rank) or a positive value."),
                                  (self.variant in ("", *VARIANTS),
                                   f"variant is {self.variant!r}; choose {', '.join(VARIANTS)}, or leave it empty "
                                   "for layers.variant."),
                                  (self.lokr_factor is None or self.lokr_factor == -1 or self.lokr_factor >= 1,
                                   f"lokr_factor is {self.lokr_factor}; use -1 (automatic), 1 or more (4–16), or "
                                   "leave it empty for layers.lokr_factor.")])


@dataclass
class LayersSection:
    preset: str = field(default="attention+mlp", **_help(
        "Which layers get a LoRA when layer_types is empty: attention, or attention+mlp."))
    blocks: str = field(default="", **_help(
        "With layer_types: transformer_blocks (double) or single_transformer_blocks; empty: both."))
    start: int = field(default=0, **_help("First block of the range (mflux's block_range.start)."))
    end: int = field(default=0, **_help("End of the range, exclusive (mflux's block_range.end); 0: the last block."))
    layer_types: list[str] = field(default_factory=list, **_help(
        "diffusers layer names (attn.to_q, proj_out, …) or preset names; empty: the preset."))
    rank: int = field(default=16, **_help("LoRA rank: 4–8 object, 8–16 face, 16–32 style (ai-toolkit's linear)."))
    alpha: float = field(default=0.0, **_help("LoRA alpha; the update is scaled by alpha/rank. 0: alpha = rank."))
    groups: list[LayerGroupSection] = field(default_factory=list, **_help(
        "Several groups, each with its own blocks, range, layer types, rank and alpha (mflux's lora_layers, "
        "ai-toolkit's per-layer ranks, SimpleTuner's LyCORIS module_algo_map); when given, the keys above are "
        "not used (variant and the lokr keys below are, for each group that doesn't set its own)."))
    variant: str = field(default="lora", **_help(
        "What each layer trains: lora; dora (magnitude and direction apart, peft's use_dora); lokr (Kronecker "
        "factors, ai-toolkit's network.type: lokr, LyCORIS/SimpleTuner's algo: lokr); loha (Hadamard product, "
        "algo: loha). kohya files of all four load in ComfyUI's LoraLoader; the diffusers format holds lora "
        "and dora only."))
    lokr_factor: int = field(default=-1, **_help(
        "LoKr: the size of the small Kronecker factor (ai-toolkit's lokr_factor, LyCORIS's factor); -1 picks "
        "it from the layer's size. 4–16 gives smaller files and a coarser update."))
    lokr_full_rank: bool = field(default=False, **_help(
        "LoKr: train the large factor whole instead of as a rank-`rank` pair (ai-toolkit's lokr_full_rank, "
        "LyCORIS's full_matrix); then alpha/rank is not used (scale 1)."))

    def __post_init__(self):
        check("layers", [(self.rank >= 1, f"rank is {self.rank}; it must be at least 1 (4–32 is usual)."),
                         (self.alpha >= 0, f"alpha is {self.alpha}; use 0 (= rank) or a positive value."),
                         (self.start >= 0 and self.end >= 0, f"start/end are {self.start}/{self.end}; use 0 or more."),
                         (self.variant in VARIANTS, f"variant is {self.variant!r}; choose {', '.join(VARIANTS)}."),
                         (self.lokr_factor == -1 or self.lokr_factor >= 1,
                          f"lokr_factor is {self.lokr_factor}; use -1 (automatic) or a factor of 1 or more (4–16).")])


@dataclass
class SaveSection:
    output: str = field(default="", **_help(
        "Folder for the run folders and the LoRA, relative to this file; empty: ./flux_dreambooth_output."))
    name: str = field(default="flux_lora", **_help("Run name: folders name_001, name_002, … and name_001.safetensors."))
    every: int = field(default=250, **_help("A checkpoint every this many steps (ai-toolkit's save_every)."))
    keep_last: int = field(default=4, **_help("Newest checkpoints kept (max_step_saves_to_keep); 0 keeps all."))
    dtype: str = field(default="fp16", **_help("Precision of the saved LoRA: fp16, bf16 or fp32."))
    format: str = field(default="kohya", **_help("kohya (lora_unet_*, what ComfyUI and most UIs read) or diffusers."))

    def __post_init__(self):
        check("save", [
            (self.every >= 1, f"every is {self.every}; save at least every 1 step (250 is usual)."),
            (self.keep_last >= 0, f"keep_last is {self.keep_last}; use 0 (keep all) or more."),
            (self.dtype in SAVE_DTYPES, f"dtype is {self.dtype!r}; choose {', '.join(SAVE_DTYPES)}."),
            (self.format in FORMATS, f"format is {self.format!r}; choose {' or '.join(FORMATS)}."),
            (bool(self.name.strip()) and not any(c in self.name for c in "/\\\0") and self.name not in (".", ".."),
             f"name is {self.name!r}; use a plain name like 'sks_dog' (no '/')."),
        ])


@dataclass
class ValidationSection:
    prompts: list[str] = field(default_factory=list, **_help(
        "Prompts rendered while training; [trigger] becomes the trigger word. Empty: no validation samples."))
    every: int = field(default=250, **_help("Render the prompts every this many steps and at the end."))
    seed: int = field(default=42, **_help("Noise seed of the samples (the same every time, to compare steps)."))
    steps: int = field(default=20, **_help("Sampling steps per image."))
    guidance: float = field(default=3.5, **_help("FLUX guidance of the samples (3.5 for dev)."))
    size: int = field(default=0, **_help("Sample size in pixels; 0: the first training resolution."))
    before_training: bool = field(default=True, **_help("Also render before the first step, to compare against."))
    scores: str = field(default="", **_help(
        "Likeness and drift at every render, and the best checkpoint (README: Scores): a folder with a "
        "transformers CLIP or SigLIP vision model (relative to this file), or 'pixels' (a fixed pooling "
        "embedder, meaningful only for the tiny model); empty: no scores."))
    max_drift: float = field(default=DEFAULT_MAX_DRIFT, **_help(
        "The best checkpoint is the most alike of those whose drift (1 − cosine similarity of the class and "
        "unrelated prompts' samples to the base model's) is at most this; 0.1–0.3."))

    def __post_init__(self):
        check("validation", [(self.every >= 1, f"every is {self.every}; render at least every 1 step."),
                             (self.steps >= 1, f"steps is {self.steps}; sample with at least 1 step (20 usual)."),
                             (self.size == 0 or (self.size >= 16 and self.size % 16 == 0),
                              f"size is {self.size}; use 0 or a multiple of 16."),
                             (self.max_drift > 0, f"max_drift is {self.max_drift}; use a value above 0 (0.1–0.3).")])


@dataclass
class Recipe:
    dataset: DatasetSection = field(default_factory=DatasetSection)
    layers: LayersSection = field(default_factory=LayersSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    save: SaveSection = field(default_factory=SaveSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    @classmethod
    def from_dict(cls, data: dict, reader: Reader | None = None) -> "Recipe":
        """A recipe from a nested dict; with a `reader`, problems are written down there (the
        `config` command); without, the first unknown key or bad value is an error."""
        own = reader or Reader()
        recipe = own.build(cls, dict(data))
        if reader is None and (own.unknown or own.invalid):
            raise RecipeError("\n".join(f"{k}: {why}" for k, why in own.unknown) if own.unknown
                              else own.invalid[0][1])
        return recipe

    def to_dict(self) -> dict:
        return fields.to_plain(self)

    def with_settings(self, pairs: list[str]) -> "Recipe":
        """This recipe with `key=value` settings (`train.steps=10`, or an alias `steps=10`)."""
        data = self.to_dict()
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                raise RecipeError(f"--set {pair!r} needs the form key=value, e.g. --set steps=100.")
            path = resolve_key(name.strip())
            node = data
            for part in path.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[path.split(".")[-1]] = value.strip()
        return Recipe.from_dict(data)


# Short names for --set: the settings people change most.
ALIASES = {
    "steps": "train.steps", "learning_rate": "train.learning_rate", "lr": "train.learning_rate",
    "batch_size": "train.batch_size", "seed": "train.seed", "rank": "layers.rank", "alpha": "layers.alpha",
    "resolution": "dataset.resolution", "save_every": "save.every", "keep_last": "save.keep_last",
    "ema_decay": "train.ema_decay", "optimizer": "train.optimizer", "lr_schedule": "train.lr_schedule",
    "warmup_steps": "train.warmup_steps", "trigger": "dataset.trigger", "caption_dropout": "dataset.caption_dropout",
    "weight_decay": "train.weight_decay", "guidance": "train.guidance", "name": "save.name",
    "loss": "train.loss", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "optimizer_args": "train.optimizer_args", "text_encoder_lr": "train.text_encoder_lr",
    "text_encoder_start": "train.text_encoder_start",
}

# Keys of the format whose field the library does not have yet: only the value it does today is
# accepted (a TrainConfig that gains the field makes this entry unused, with no change here).

TRAIN_HELP = {
    "steps": "Optimizer steps. 10–20 photos: 1000–2000 for a subject, more for a style.",
    "learning_rate": "1e-4 is the usual FLUX LoRA rate; 5e-5 for faces or long runs. The tiny model takes 2e-3.",
    "batch_size": "Images per step; 1 is best for small datasets.",
    "seed": "Seeds LoRA init, image order, noise and σ: same seed, same LoRA.",
    "weight_decay": "AdamW weight decay on the LoRA (1e-4 diffusers, 0.01 ai-toolkit).",
    "max_grad_norm": "Clip the gradient norm to this; 0 turns clipping off.",
    "lr_schedule": "Learning-rate schedule after warm-up (diffusers' get_scheduler): constant, "
                   "constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial (SimpleTuner's default).",
    "warmup_steps": "Steps to ramp the learning rate up from 0 (SimpleTuner uses 100).",
    "guidance": "The guidance value a guidance-distilled model (FLUX.1-dev) is told while training; 1.0 is usual.",
    "ema_decay": "0 = off; 0.999 as in ai-toolkit's ema_config: the saved LoRA is the (warmed-up) average.",
    "optimizer": "adamw, adamw8bit (bitsandbytes), adafactor, prodigy, lion, adamw_schedulefree; other tools' "
                 "spellings (AdamW8bit, prodigyopt) are accepted.",
    "optimizer_args": "Extra optimizer arguments, kohya's --optimizer_args style (d_coef=2 betas=0.9,0.99) or a "
                      "mapping ({d_coef: 2}).",
    "gradient_accumulation_steps": "Batches whose gradients add up to one optimizer step (1 = off).",
    "lr_num_cycles": "Hard restarts of cosine_with_restarts (diffusers' --lr_num_cycles).",
    "lr_power": "Exponent of the polynomial schedule (diffusers' --lr_power; 1.0 decays linearly).",
    "lr_end": "Learning rate the polynomial schedule ends at (SimpleTuner's --lr_end, 4e-7).",
    "dop_multiplier": "Differential output preservation (ai-toolkit's diff_output_preservation and "
                      "diff_output_preservation_multiplier): each step also holds the LoRA's prediction for the "
                      "caption with the trigger replaced by the class word to the frozen model's, so the class "
                      "word keeps its meaning. 0 = off; 0.5–1.0 usual (1.0 is ai-toolkit's); about 2 more "
                      "forward passes per step.",
    "dop_class": "The class word DOP puts in place of the trigger ('person'; ai-toolkit's "
                 "diff_output_preservation_class); empty: the dataset's class_word.",
    "text_encoder_lr": "Also train a LoRA on the text encoder, at this rate (diffusers' --text_encoder_lr); 0 = off. "
                       "5e-6 to 3e-5; helps the likeness of faces and names, costs memory and time. ai-toolkit "
                       "recipes lower the global lr to 3e-5 when the text encoder goes on only for want of a "
                       "separate rate: set this instead.",
    "text_encoder_start": "When the text encoder starts training: a fraction of the steps below 1 (0.8–0.85 as in "
                          "ai-toolkit's late text-encoder finetune), else a step number; 0 = from the first step "
                          "(diffusers' --train_text_encoder).",
    "text_encoder_rank": "Rank of the text encoder's LoRA (alpha = rank); 0 = the transformer LoRA's rank and alpha.",
    "text_encoder_t5": "Also train T5-XXL (kohya's lora_te3); false = CLIP-L only, as diffusers does. T5 costs far "
                       "more memory and time, and diffusers-format files can't hold it (save kohya).",
}
EXTRA_HELP = {
    "TrainConfig": TRAIN_HELP,
    "TimestepSampling": {"mode": "How σ is drawn: flux_shift (logit-normal shifted for image size), logit_normal, "
                                 "uniform, sigmoid and weighted (ai-toolkit's timestep_type), mode or cosmap "
                                 "(diffusers' --weighting_scheme).",
                         "logit_mean": "Mean of the logit-normal draw.",
                         "logit_std": "Spread of the logit-normal draw.",
                         "mode_scale": "Scale of the mode scheme (diffusers' --mode_scale, 1.29).",
                         "shift": "A fixed shift of σ (SD3's 3.0, SimpleTuner's flow_schedule_shift); 1 = none. "
                                  "Not with flux_shift, which shifts by image size."},
    "LossSettings": {"kind": "The loss: mse (usual), l1, huber or pseudo_huber (kohya's --loss_type).",
                     "huber_c": "Where the Huber losses turn from squared to linear (0.1 in kohya and SimpleTuner).",
                     "weighting": "Loss weighting over σ (diffusers' --weighting_scheme): none, sigma_sqrt, cosmap."},
    "MemoryConfig": {"checkpointing": "Gradient checkpointing: blocks, offload (to CPU) or off.",
                     "checkpoint_every": "With blocks: checkpoint every k-th block.",
                     "swap_blocks": "Keep the last N blocks' weights in CPU memory, streamed in when used.",
                     "compile": "torch.compile each block (needs a working Triton).",
                     "base_quantization": "none, or int8: the blocks' Linear weights held in int8 while training "
                                          "(torchao, `pip install torchao`; mflux's quantize 8, SimpleTuner's "
                                          "int8-quanto); not with swap_blocks."},
}


def all_keys() -> list[Key]:
    """Every key of the format, dotted, with type, default and help."""
    return fields.keys(Recipe, extra_help=EXTRA_HELP)


def resolve_key(name: str) -> str:
    """A dotted key or an alias, checked against the format (an error with the close matches)."""
    path = ALIASES.get(name, name)
    known = [k.path for k in all_keys()]
    sections = {f.name for f in dataclasses.fields(Recipe)}
    if path not in known and not any(k.startswith(f"{path}.") for k in known) or path in sections:
        raise RecipeError(f"--set {name}: not a key of the recipe format{fields.suggest(name, known + list(ALIASES))} "
                          "(`python -m trainer keys` lists them).")
    return path


def value_of(recipe: Recipe, path: str) -> Any:
    node: Any = recipe
    for part in path.split("."):
        node = getattr(node, part)
    return node
