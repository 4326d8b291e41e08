"""A recipe made into what the library trains with: the dataset, the layer selection, the run
settings. Paths are read relative to the recipe's folder (`base`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import controls, datasets
from ..data.augment import Augmentation
from ..data.images import Shaping
from ..lora.targets import LayerGroup, LayerSpec, ModelLayout, parse_layer_types
from ..outputs.checkpoints import RunSettings
from .fields import RecipeError
from .importing import is_examples_file, paths_of
from .schema import LayerGroupSection, Recipe


def check_paths(recipe: Recipe, base: Path, origins: dict[str, str] | None = None) -> None:
    """Every folder the recipe names exists: else an error naming the key (the imported file's own
    key, such as ai-toolkit's `folder_path`, when `origins` tells it) and the path."""
    if not recipe.dataset.folders:
        raise RecipeError("dataset.folders is empty; name the folder of your photos, e.g. `folders: [photos]`.")
    for key, value, path in paths_of(recipe, base):
        if not (path.is_dir() or is_examples_file(path)):
            what = "is a file, not a folder" if path.exists() else "does not exist"
            ours, _, index = key.partition("[")
            setting = (origins or {}).get(ours, ours)
            raise RecipeError(f"{setting}{'[' + index if index else ''} is {value!r}: {path} {what}. Change {setting} "
                              "in the config "
                              "(relative paths are read from the config's folder) or --set it.")


def dataset(recipe: Recipe, base: Path) -> datasets.Dataset:
    """The subject's photos at each resolution, then the regularisation photos (no trigger)."""
    d = recipe.dataset
    parts = []
    for resolution in d.resolution:
        shaping = Shaping(resolution, d.bucketing, d.crop, minimum_image_size=d.minimum_image_size,
                          maximum_image_size=d.maximum_image_size, target_downsample_size=d.target_downsample_size)
        augment = Augmentation(flip=d.flip, caption_dropout=d.caption_dropout, shuffle_tags=d.shuffle_tags)
        subject = datasets.Options(d.trigger.strip(), d.class_word.strip(), d.repeats, d.captions, d.default_caption,
                                   shaping, augment, d.problems, d.caption_ext)
        for i, f in enumerate(d.folders):
            part = _source(base / Path(f).expanduser(), subject, d.concepts).with_items(network_weight=d.network_weight)
            parts.append(controls.with_controls(part, base / Path(d.control_path[i]).expanduser())
                         if d.control_path else part)
        # regularisation photos without a caption: the class prompt, else the class word (never the subject's
        # default_caption)
        fallback = d.regularisation_caption.strip() or d.class_word.strip()
        regularisation = datasets.Options("", d.class_word.strip(), 1, d.captions, fallback, shaping, Augmentation(),
                                          d.problems, d.caption_ext)
        parts += [_source(base / Path(f).expanduser(), regularisation).with_items(
                  regularisation=True, loss_weight=d.regularisation_weight,
                  network_weight=d.regularisation_network_weight) for f in d.regularisation]
    return sum(parts[1:], parts[0])


def _source(path: Path, options: datasets.Options, concepts: bool = False) -> datasets.Dataset:
    """A folder of photos, or an mflux train config whose `examples` block lists them with their prompts."""
    if is_examples_file(path):
        return datasets.from_mflux_config(path, options)[0]
    return datasets.from_folder(path, options, concepts)


def group_variant(group: LayerGroupSection, layers: dict) -> dict:
    """A group's variant settings: its own where it sets them, else the layers' (`layers`: variant,
    lokr_factor, lokr_full_rank)."""
    own = {"variant": group.variant or None, "lokr_factor": group.lokr_factor, "lokr_full_rank": group.lokr_full_rank}
    return {k: layers[k] if v is None else v for k, v in own.items()}


def layer_spec(recipe: Recipe, layout: ModelLayout) -> LayerSpec:
    """`layers.layer_types` on `layers.blocks` (both groups when empty) from start to end, or the
    preset on every block; every group trains `layers.variant`, or with `layers.groups` the
    variant settings each group sets itself."""
    layers = recipe.layers
    alpha = layers.alpha or None
    variant = {"variant": layers.variant, "lokr_factor": layers.lokr_factor, "lokr_full_rank": layers.lokr_full_rank}
    try:
        if layers.groups:
            spec = LayerSpec(tuple(LayerGroup(g.blocks, g.start, g.end or layout.depth(g.blocks),
                                              parse_layer_types(" ".join(g.layer_types), g.blocks, layout.vocabulary),
                                              g.rank, g.alpha or None, **group_variant(g, variant))
                                   for g in layers.groups))
            spec.targets(layout)
            return spec
        if not layers.layer_types:
            if layers.blocks or layers.start or layers.end:
                raise RecipeError("layers.blocks/start/end need layers.layer_types (e.g. [attn.to_q, proj_out]); "
                                  "or clear them to use layers.preset on every block.")
            return LayerSpec.preset(layers.preset, layout, layers.rank, alpha, **variant)
        groups = [layers.blocks] if layers.blocks else list(layout.vocabulary.layers)
        built = []
        for blocks in groups:
            types = parse_layer_types(" ".join(layers.layer_types), blocks, layout.vocabulary)
            if not layers.blocks:  # both groups: each takes the names it has
                types = tuple(t for t in types if t in layout.vocabulary.layers.get(blocks, {}))
                if not types:
                    continue
            end = layers.end or layout.depth(blocks)
            built.append(LayerGroup(blocks, layers.start, end, types, layers.rank, alpha, **variant))
        if not built:
            raise RecipeError(f"layers.layer_types {layers.layer_types} names no layer of this model.")
        spec = LayerSpec(tuple(built))
        spec.targets(layout)  # checked against the model's depth and names
        return spec
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"layers: {e}") from None


@dataclass(frozen=True)
class RecipeLayers:
    """A recipe's layer selection, made into a LayerSpec once the model, and so its depths, is known
    (a preset, or `end: 0` for the last block)."""

    recipe: Recipe

    def resolved(self, layout: ModelLayout) -> LayerSpec:
        return layer_spec(self.recipe, layout)


def run_settings(recipe: Recipe, resume: str = "") -> RunSettings:
    save = recipe.save
    return RunSettings(save.name.strip(), save.every, save.keep_last, resume)
