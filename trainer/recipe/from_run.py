"""The recipe of a training run, built from what actually trains (the TrainConfig, the layer spec,
the dataset's items, the validation plan, the run settings), and written into the run folder as
`recipe.yaml` (our format: `python -m trainer train --config`, Import Training Config) and
`recipe_ai_toolkit.yaml` (an ai-toolkit job), so a workflow's recipe can be shared as text.

What a file can't hold (photos given as an IMAGE batch, the model as a live ComfyUI object, a
second subject's own trigger word, …) is listed in `notes`: at the top of both files and in the
log, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .. import families, files
from ..data.augment import Augmentation
from ..data.datasets import Dataset, DatasetItem, Origin
from ..log import logger
from ..loop.config import TrainConfig
from ..lora.targets import LayerSpec, ModelLayout
from ..outputs.checkpoints import RunSettings
from . import ai_toolkit, text
from .schema import DatasetSection, LayerGroupSection, LayersSection, Recipe, SaveSection, ValidationSection

log = logger(__name__)

RECIPE_FILE, AI_TOOLKIT_FILE = "recipe.yaml", "recipe_ai_toolkit.yaml"


@dataclass
class RunRecipe:
    recipe: Recipe
    notes: list[str] = field(default_factory=list)  # what the files can't hold, for a person
    family: str = "flux1"  # the model family the run trained (families.FAMILIES): ai-toolkit jobs are FLUX.1's


def validation_section(prompts: Sequence[str], seeds: Sequence[int], guidances: Sequence[float],
                       steps: Sequence[int], every: int, width: int, height: int, before_training: bool,
                       sampler: str = "euler", scheduler: str = "simple") -> tuple[ValidationSection, list[str]]:
    """An evaluation set (prompts × seeds × guidance × steps) as our one-seed validation section,
    and what it can't hold."""
    notes = []
    for name, values in (("seeds", seeds), ("guidance", guidances), ("sample_steps", steps)):
        if len(set(values)) > 1:
            notes.append(f"validation {name} {', '.join(map(str, dict.fromkeys(values)))}: the recipe renders one "
                         f"(written: {values[0]}).")
    if width != height:
        notes.append(f"validation size {width}×{height}: the recipe renders square samples (written: {width}).")
    if (sampler, scheduler) != ("euler", "simple"):
        notes.append(f"validation sampler {sampler} / {scheduler}: the recipe renders with euler / simple.")
    section = ValidationSection(list(dict.fromkeys(prompts)), every, seeds[0], steps[0], guidances[0], width,
                                before_training)
    return section, notes


def _parts(items: Sequence[DatasetItem]) -> list[tuple[tuple, list[DatasetItem]]]:
    """The dataset's items by where they came from (one folder, its regularisation flag and weights),
    in order; the resolutions of one folder together."""
    parts: dict[tuple, list[DatasetItem]] = {}
    for item in items:
        origin = item.origin
        if origin is not None:  # one folder at several resolutions is one part (the resolution set aside)
            options = replace(origin.options, shaping=replace(origin.options.shaping, resolution=512))
            origin = replace(origin, options=options)
        parts.setdefault((origin, item.regularisation, item.loss_weight, item.network_weight), []).append(item)
    return list(parts.items())


def _flat(origin: Origin) -> dict:
    """A folder's options, its shaping's and augmentation's fields among them."""
    options = dataclasses.asdict(origin.options)
    return {**{k: v for k, v in options.items() if not isinstance(v, dict)}, **options["shaping"],
            **options["augment"]}


def _differences(first: Origin, other: Origin, names: Sequence[str]) -> list[str]:
    """`other`'s options among `names` that differ from `first`'s, as 'name value'."""
    a, b = _flat(first), _flat(other)
    return [f"{k} {b[k]!r}" for k in names if a.get(k) != b.get(k)]


SHARED = ("trigger_word", "class_word", "repeats", "captions", "default_caption", "problems", "caption_ext",
          "bucketing", "crop", "upscale_small", "minimum_image_size", "maximum_image_size", "target_downsample_size",
          "flip", "color_jitter", "views", "caption_dropout", "shuffle_tags")


REGULARISATION_SHARED = ("class_word", "captions", "problems", "caption_ext", "bucketing", "crop", "upscale_small",
                         "minimum_image_size", "maximum_image_size", "target_downsample_size")


def dataset_section(dataset: Dataset) -> tuple[DatasetSection, list[str]]:
    """The dataset's folders and options as our dataset section, and what it can't hold."""
    notes, subject, regularisation = [], [], []
    for (origin, is_reg, loss_weight, network_weight), items in _parts(dataset.items):
        if origin is None or origin.kind == "images":
            what = origin.path if origin is not None else "another node"
            notes.append(f"dataset: {len(items)} image(s) from {what} came as an IMAGE batch, not a folder: a file "
                         "can't hold them; save them into a folder and add it to dataset.folders.")
            continue
        (regularisation if is_reg else subject).append((origin, loss_weight, network_weight, items))
    if not subject:
        notes.append("dataset.folders: no folder of subject photos (only images a file can't hold).")
    first = subject[0][0] if subject else regularisation[0][0] if regularisation else None
    o = first.options if first else None
    section = DatasetSection() if o is None else DatasetSection(
        folders=[], trigger=o.trigger_word, class_word=o.class_word, captions=o.captions,
        default_caption=o.default_caption, caption_dropout=o.augment.caption_dropout,
        shuffle_tags=o.augment.shuffle_tags, repeats=o.repeats, bucketing=o.shaping.bucketing, crop=o.shaping.crop,
        minimum_image_size=o.shaping.minimum_image_size, maximum_image_size=o.shaping.maximum_image_size,
        target_downsample_size=o.shaping.target_downsample_size, caption_ext=o.caption_ext, flip=o.augment.flip,
        concepts=first.concepts, problems=o.problems)
    if o is not None:
        if o.shaping.upscale_small:
            notes.append("dataset upscale_small true: the recipe has no such key (small photos train at a smaller "
                         "bucket).")
        plain = Augmentation(flip=o.augment.flip, caption_dropout=o.augment.caption_dropout,
                             shuffle_tags=o.augment.shuffle_tags)
        if (o.augment.color_jitter, o.augment.views) != (plain.color_jitter, plain.views):
            notes.append(f"Dataset Augmentation color_jitter {o.augment.color_jitter:g}, views {o.augment.views}: "
                         "the recipe has no such keys (flip, caption_dropout and shuffle_tags it has).")
    resolutions: list[int] = []
    for origin, _, network_weight, items in subject:
        section.folders.append(origin.path)
        if items[0].control is not None:  # Kontext edit pairs: their control folder, one per folder
            section.control_path.append(str(items[0].control.parent.absolute()))
        resolutions += [r for r in dict.fromkeys(i.shaping.resolution for i in items) if r not in resolutions]
        differ = _differences(first, origin, SHARED)
        if differ:
            notes.append(f"dataset {origin.path}: {', '.join(differ)}; the recipe has one setting for every folder "
                         f"(written: the first folder's).")
        if network_weight != subject[0][2]:
            notes.append(f"dataset {origin.path}: network_weight {network_weight:g}; the recipe has one for every "
                         f"subject folder (written: {subject[0][2]:g}).")
    for origin, loss_weight, network_weight, items in regularisation:
        section.regularisation.append(origin.path)
        differ = _differences(first, origin, REGULARISATION_SHARED) + [
            f"{k} {v!r}" for k, v in (("repeats", origin.options.repeats), ("augment", origin.options.augment))
            if v != {"repeats": 1, "augment": Augmentation()}[k]]
        if differ:
            notes.append(f"regularisation set {origin.path}: {', '.join(differ)}; the recipe trains regularisation "
                         "photos with the subject's settings, once per epoch, unaugmented.")
        resolutions += [r for r in dict.fromkeys(i.shaping.resolution for i in items) if r not in resolutions]
        if origin is regularisation[0][0]:
            section.regularisation_weight, section.regularisation_network_weight = loss_weight, network_weight
            section.regularisation_caption = origin.options.default_caption
        elif (loss_weight, network_weight, origin.options.default_caption) != (
                section.regularisation_weight, section.regularisation_network_weight, section.regularisation_caption):
            notes.append(f"regularisation set {origin.path}: loss_weight {loss_weight:g}, network_weight "
                         f"{network_weight:g}, default_caption {origin.options.default_caption!r}; the recipe has "
                         "one of each for every regularisation folder (written: the first's).")
    for origin, _, _, items in subject + regularisation:
        own = sorted({i.shaping.resolution for i in items})
        if own != sorted(resolutions):
            notes.append(f"dataset {origin.path} trains at {', '.join(map(str, own))}: the recipe trains every "
                         f"folder at each resolution ({', '.join(map(str, resolutions))}).")
    if subject:
        section.network_weight = subject[0][2]
    section.resolution = resolutions or [512]
    return DatasetSection(**{f.name: getattr(section, f.name) for f in dataclasses.fields(section)}), notes


def layers_section(spec: LayerSpec, layout: ModelLayout) -> LayersSection:
    """The layer spec as our layers section: a preset when it is one, else its groups (a group that
    ends at the model's last block ends at 0, the last block of any FLUX.1)."""
    first = spec.groups[0]
    common = {"variant": first.variant, "lokr_factor": first.lokr_factor, "lokr_full_rank": first.lokr_full_rank}
    for name in layout.vocabulary.presets:
        if LayerSpec.preset(name, layout, first.rank, first.alpha, **common) == spec:
            return LayersSection(preset=name, rank=first.rank, alpha=first.alpha or 0.0, **common)
    groups = [LayerGroupSection(g.blocks, g.start, 0 if g.end == layout.depth(g.blocks) else g.end,
                                list(g.layer_types), g.rank, g.alpha or 0.0,
                                "" if g.variant == first.variant else g.variant,
                                None if g.lokr_factor == first.lokr_factor else g.lokr_factor,
                                None if g.lokr_full_rank == first.lokr_full_rank else g.lokr_full_rank)
              for g in spec.groups]
    return LayersSection(rank=first.rank, alpha=first.alpha or 0.0, groups=groups, **common)


def recipe_of_run(config: TrainConfig, spec: LayerSpec, layout: ModelLayout, dataset: Dataset, run: RunSettings,
                  validation: tuple[ValidationSection, list[str]] | None = None, save: SaveSection | None = None,
                  notes: Sequence[str] = ()) -> RunRecipe:
    """The recipe that trains what this run trains; `notes`: the caller's own (the model, …)."""
    data, data_notes = dataset_section(dataset)
    section, validation_notes = validation or (ValidationSection(), [])
    save = replace(save or SaveSection(), name=run.name, every=run.save_every, keep_last=run.keep_last)
    all_notes = [*notes, *data_notes, *validation_notes]
    if len(dataset.triggers) > 1:
        all_notes.append(f"subjects {', '.join(dataset.triggers)}: the recipe has one trigger word (written: "
                         f"{dataset.triggers[0]}); [trigger2] in prompts needs a second subject.")
    if run.resume_from.strip():
        all_notes.append(f"resumed from {run.resume_from.strip()}: the recipe starts fresh (`--resume latest` "
                         "continues a run).")
    recipe = Recipe(data, layers_section(spec, layout), config, save, section)
    return RunRecipe(recipe, all_notes, families.of_layout(layout).name)


def _commented(body: str, notes: Sequence[str]) -> str:
    if not notes:
        return body
    lines = ["# Not in this file (a file can't hold it; the run trained with it):"]
    lines += [f"#   {note}" for note in notes]
    return "\n".join(lines) + "\n" + body


def write_run_recipe(folder: str | Path, run: RunRecipe) -> list[Path]:
    """recipe.yaml and recipe_ai_toolkit.yaml into the run folder, each written whole or not at all;
    what they can't hold at the top of both and in the log."""
    folder = Path(folder)
    for note in run.notes:
        log.warning("Recipe of %s: %s", folder.name, note)
    written = [files.write_text(folder / RECIPE_FILE, _commented(text.to_yaml(run.recipe), run.notes))]
    if run.family != "flux1":  # the job would name FLUX.1-dev and its layers
        log.warning("Recipe of %s: no %s (this pack writes ai-toolkit jobs for FLUX.1 runs; this one trained %s).",
                    folder.name, AI_TOOLKIT_FILE, families.family(run.family).label)
        return written
    try:
        job = ai_toolkit.write(run.recipe)
    except ValueError as e:  # e.g. layers ai-toolkit's full-size FLUX can't take: say so, keep training
        log.warning("Recipe of %s: no %s (ai-toolkit can't express it: %s).", folder.name, AI_TOOLKIT_FILE, e)
        return written
    written.append(files.write_text(folder / AI_TOOLKIT_FILE, _commented(job, run.notes)))
    log.info("Wrote the run's recipe: %s", ", ".join(str(p) for p in written))
    return written
