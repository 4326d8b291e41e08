"""Dataset nodes: a folder of photos (with captions, subfolder concepts), an mflux train config,
or images from other nodes; augmentation; regularisation sets."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.data import controls, datasets
from ..trainer.data import report as dataset_report
from ..trainer.data.augment import Augmentation
from ..trainer.data.images import Shaping
from ..trainer.lora.targets import LayerSpec
from ..trainer.parsing import number_list
from . import ids, sockets
from .host import paths

TRIGGER_TIP = ("A rare word that will mean your subject, e.g. 'sks' or 'ohwx'. Put into every caption: it replaces "
               "'[trigger]', or is prepended (with the class) when the caption lacks it. Empty for styles whose "
               "captions already say everything.")
CLASS_TIP = ("What the subject is: 'person', 'dog', 'toy' (ai-toolkit recipes write 'kvthvmi_ person, …'). "
             "Prepended with the trigger word, and kept when captions drop out.")
REPEATS_TIP = ("How often each image appears per epoch, relative to the datasets chained to this one: raise it for "
               "a set with fewer photos. 1 is fine for a dataset on its own.")
NETWORK_WEIGHT_TIP = ("The LoRA's multiplier while training on these photos (ai-toolkit's per-dataset "
                      "network_weight): 1 as usual; below 1 the LoRA learns them more gently; 0 trains them "
                      "through the frozen model (no LoRA update); negative values push the LoRA away from them.")
PREVIOUS_TIP = ("Another dataset to train on together with this one: a second subject with its own trigger word, a "
                "regularisation set, or more photos of the same one.")


def shaping_inputs() -> list:
    return [
        io.String.Input("resolution", default="512",
                        tooltip="Training size: the pixel area of the buckets (512 → about 512×512). 512 learns "
                                "likeness fast, 1024 fine detail. Several, e.g. '512, 1024', train each photo at "
                                "each (SimpleTuner's multi-resolution training)."),
        io.Boolean.Input("bucketing", default=True,
                         tooltip="Keep each photo's aspect ratio (buckets from 1:4 to 4:1, sides multiples of 16) "
                                 "instead of cropping everything square."),
        io.Combo.Input("crop", options=["center", "random"], default="center",
                       tooltip="Where to crop what doesn't fit the bucket. random makes a few crops per photo "
                               "(see Dataset Augmentation's views)."),
        io.Boolean.Input("upscale_small", default=False,
                         tooltip="Enlarge photos smaller than their bucket instead of reporting them. Blurry "
                                 "photos teach blur: better lower the resolution."),
        io.Combo.Input("problems", options=list(datasets.PROBLEMS), default="stop",
                       tooltip="stop: any unreadable photo, missing caption or too-small photo is an error naming "
                               "them all. skip: train on the rest and list them in the summary."),
        io.Int.Input("minimum_image_size", default=0, min=0, max=8192, step=16, optional=True,
                     tooltip="The shorter side a photo needs, in pixels (SimpleTuner's minimum_image_size). A "
                             "photo smaller than its bucket is never enlarged: it trains at the largest bucket of "
                             "its shape that it covers, and only photos under this size are reported. 0: half "
                             "the resolution (256 at 512). Raise it to keep small photos out of a 1024 run."),
        io.Int.Input("maximum_image_size", default=0, min=0, max=65535, step=16, optional=True,
                     tooltip="SimpleTuner's maximum_image_size: a photo larger than this (√(width·height), in "
                             "pixels) is first downsampled to target_downsample_size and then cropped to its "
                             "bucket, so very large photos train as a closer view instead of the whole frame. "
                             "0: off (every photo is fitted whole to its bucket, the usual choice)."),
        io.Int.Input("target_downsample_size", default=0, min=0, max=65535, step=16, optional=True,
                     tooltip="SimpleTuner's target_downsample_size: the size photos above maximum_image_size are "
                             "downsampled to before the crop (e.g. 1536 and 1024 at resolution 512). 0: the "
                             "resolution."),
    ]


def subject_inputs(trigger_default: str = "sks") -> list:
    return [
        sockets.Dataset.Input("previous", optional=True, tooltip=PREVIOUS_TIP),
        sockets.Augment.Input("augment", optional=True,
                              tooltip="From Dataset Augmentation (all off when unconnected)."),
        io.String.Input("trigger_word", default=trigger_default, tooltip=TRIGGER_TIP),
        io.String.Input("class_word", default="", tooltip=CLASS_TIP),
        io.Int.Input("repeats", default=1, min=1, max=1000, tooltip=REPEATS_TIP),
    ]


def build(make, previous, augment, trigger_word, class_word, repeats, resolution, bucketing, crop, upscale_small,
          problems, minimum_image_size=0, maximum_image_size=0, target_downsample_size=0,
          **options) -> datasets.Dataset:
    """`make(options)` once per resolution, chained after `previous`; the problems of every
    resolution in one error."""
    parts, errors = [], []
    for r in number_list(resolution, int, "resolution", "512, 1024"):
        try:
            parts.append(make(datasets.Options(trigger_word.strip(), class_word.strip(), repeats,
                                               augment=augment or Augmentation(), problems=problems,
                                               shaping=Shaping(r, bucketing, crop, upscale_small, minimum_image_size,
                                                               maximum_image_size, target_downsample_size),
                                               **options)))
        except datasets.DatasetError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        found = list(dict.fromkeys(p for e in errors for p in e.problems))
        raise datasets.DatasetError(f"{len(found)} problem(s) at the resolutions {resolution}:\n  "
                                    + "\n  ".join(found), tuple(found))
    out = sum(parts[1:], parts[0])
    return out if previous is None else previous + out


def summary(dataset: datasets.Dataset) -> str:
    captions = "\n".join(f"{i.name}: {i.caption}" for i in dataset.items[:8])
    more = f"\n… and {len(dataset) - 8} more" if len(dataset) > 8 else ""
    skipped = f"\nLeft out ({len(dataset.skipped)}):\n  " + "\n  ".join(dataset.skipped) if dataset.skipped else ""
    triggers = ", ".join(f"[trigger{n + 1 if n else ''}] = {t}" for n, t in enumerate(dataset.triggers))
    pairs = sorted({str(i.control.parent) for i in dataset.items if i.control is not None})
    paired = f"\nedit pairs (Kontext): control images from {', '.join(pairs)}" if pairs else ""
    return (f"{len(dataset)} images from {dataset.source}" + (f"\nsubjects: {triggers}" if triggers else "")
            + paired + f"\n{captions}{more}{skipped}")


class DatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.DATASET_FOLDER,
            display_name="DreamBooth Dataset (folder)",
            category=sockets.Category.DATASET,
            description="Photos with captions: same-name .txt files (photo.jpg + photo.txt), a metadata file "
                        "(metadata.jsonl/.json/.csv), or file names. JPEG, PNG, WebP; rotated, transparent, CMYK "
                        "and 16-bit photos are handled. Problems are reported by file name.",
            inputs=[
                *subject_inputs(),
                io.String.Input("folder", default="builtin:quickstart",
                                tooltip="Folder of images and captions. Absolute, or relative to ComfyUI's input "
                                        "folder. 'builtin:quickstart' is the small example set of this pack."),
                io.Combo.Input("captions", options=list(datasets.CAPTION_SOURCES), default="auto",
                               tooltip="auto: the .txt file, else the folder's metadata file. txt, metadata: only "
                                       "that. filename: 'sks_dog_on_grass.jpg' → 'sks dog on grass'."),
                io.String.Input("default_caption", default="",
                                tooltip="Caption for photos that have none (ai-toolkit's default_caption), e.g. "
                                        "'person' for a regularisation set (through Regularisation Set it trains "
                                        "as written, without the trigger word). Empty: a missing caption is a "
                                        "problem."),
                io.Boolean.Input("subfolders_as_concepts", default=False,
                                 tooltip="Each subfolder is a subject: kohya's '10_sks dog' = 10 repeats, trigger "
                                         "'sks', class 'dog'. Train several subjects at once."),
                *shaping_inputs(),
                io.Float.Input("network_weight", default=1.0, min=-2.0, max=2.0, step=0.05, optional=True,
                               tooltip=NETWORK_WEIGHT_TIP),
                io.String.Input("caption_ext", default="txt", optional=True,
                                tooltip="The captions' file extension (ai-toolkit's caption_ext): 'txt' for "
                                        "photo.txt, 'caption' for photo.caption. Only the captions=auto and txt "
                                        "choices read these files."),
                io.String.Input("control_folder", default="", optional=True,
                                tooltip="For an edit LoRA (FLUX.1 Kontext): the folder of source images, the "
                                        "images before the edit, each named as its photo after the edit in "
                                        "folder (ai-toolkit's control_path; the extension may differ). Each is "
                                        "resized and cropped as its photo and goes in as the reference image. "
                                        "Absolute or relative to ComfyUI's input folder; 'builtin:kontext_controls' "
                                        "pairs with 'builtin:kontext'. Empty: a plain LoRA."),
            ],
            outputs=[sockets.Dataset.Output(display_name="dataset"),
                     io.String.Output(display_name="summary", tooltip="Image count, captions, what was left out.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, control_folder="", **_):
        marks = [datasets.fingerprint(paths.resolve_input_path(folder, "folder"))]
        if control_folder.strip():
            marks.append(datasets.fingerprint(paths.resolve_input_path(control_folder, "control_folder")))
        return "|".join(marks)

    @classmethod
    def execute(cls, folder, captions, default_caption, subfolders_as_concepts, previous=None, augment=None,
                network_weight=1.0, control_folder="", **common) -> io.NodeOutput:
        path = paths.resolve_input_path(folder, "folder")
        pairs = paths.resolve_input_path(control_folder, "control_folder") if control_folder.strip() else None
        if pairs is not None and subfolders_as_concepts:
            raise datasets.DatasetError("control_folder pairs the photos of one folder; turn off "
                                        "subfolders_as_concepts, or chain one Dataset node per concept folder.")

        def make(o):
            part = datasets.from_folder(path, o, subfolders_as_concepts).with_items(network_weight=network_weight)
            return part if pairs is None else controls.with_controls(part, pairs)
        dataset = build(make, previous, augment, captions=captions, default_caption=default_caption, **common)
        if pairs is not None:
            controls.has_controls(dataset)  # every chained dataset paired, or a clear error
        return io.NodeOutput(dataset, summary(dataset))


class DatasetFromMfluxConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.DATASET_MFLUX,
            display_name="DreamBooth Dataset (mflux config)",
            category=sockets.Category.DATASET,
            description="Reads an mflux train config: its `examples` block (a path and {image, prompt} pairs) "
                        "becomes the dataset, its `lora_layers` the layer selection.",
            inputs=[
                *subject_inputs(trigger_default=""),
                io.String.Input("config_path", default="",
                                tooltip="Path to the mflux JSON config (absolute, or relative to ComfyUI's input "
                                        "folder). Image paths are read relative to the config, as mflux does."),
                *shaping_inputs(),
            ],
            outputs=[sockets.Dataset.Output(display_name="dataset"),
                     sockets.LoraLayers.Output(display_name="lora_layers",
                                       tooltip="The config's lora_layers, for the Train node's lora_layers input."),
                     io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, config_path, **_):
        return datasets.fingerprint(paths.resolve_input_path(config_path, "config_path"))

    @classmethod
    def execute(cls, config_path, previous=None, augment=None, **common) -> io.NodeOutput:
        path = paths.resolve_input_path(config_path, "config_path")
        config = {}

        def make(options):
            dataset, read = datasets.from_mflux_config(path, options)
            config.update(read)
            return dataset

        dataset = build(make, previous, augment, **common)
        layers = LayerSpec.from_mflux(config["lora_layers"], source=str(path)) if config.get("lora_layers") else None
        return io.NodeOutput(dataset, layers, summary(dataset))


class DatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.DATASET_IMAGES,
            display_name="DreamBooth Dataset (images)",
            category=sockets.Category.DATASET,
            description="Train on images that come from other nodes (Load Image, a batch, generated images), with "
                        "one caption per line.",
            inputs=[
                *subject_inputs(),
                io.Image.Input("images", tooltip="An IMAGE batch."),
                io.String.Input("captions", multiline=True, default="a photo of [trigger]",
                                tooltip="One caption per image, one per line; or a single line for all of them."),
                *shaping_inputs(),
            ],
            outputs=[sockets.Dataset.Output(display_name="dataset"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, images, captions, previous=None, augment=None, **common) -> io.NodeOutput:
        lines = [c.strip() for c in captions.splitlines() if c.strip()] or [""]
        dataset = build(lambda o: datasets.from_images(images, lines, o), previous, augment, **common)
        return io.NodeOutput(dataset, summary(dataset))


class DatasetAugmentation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.AUGMENT,
            display_name="Dataset Augmentation",
            category=sockets.Category.DATASET,
            description="Variations for small datasets, all off by default: flipping a face or shifting skin "
                        "colour changes likeness. Each photo gets a few views, encoded once; a step uses one.",
            inputs=[
                io.Boolean.Input("flip", default=False,
                                 tooltip="Mirror half the views. Good for objects and styles; off for faces and "
                                         "anything with text or asymmetric marks."),
                io.Float.Input("color_jitter", default=0.0, min=0.0, max=0.5, step=0.01,
                               tooltip="Random brightness, contrast and saturation ±this. 0.05 is gentle; off for "
                                       "skin tones and brand colours."),
                io.Int.Input("views", default=4, min=1, max=32,
                             tooltip="Augmented versions per photo (and per random crop). More variety, longer "
                                     "encoding and a bigger cache."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.9, step=0.01,
                               tooltip="How often a step sees only the trigger word and class instead of the "
                                       "caption, so the trigger carries the subject (ai-toolkit's "
                                       "caption_dropout_rate; 0.18–0.25 for a person)."),
                io.Boolean.Input("shuffle_tags", default=False,
                                 tooltip="For tag-style captions ('sks, smiling, outdoors'): shuffle the tags after "
                                         "the first, so order doesn't matter."),
            ],
            outputs=[sockets.Augment.Output(display_name="augment")],
        )

    @classmethod
    def execute(cls, flip, color_jitter, views, caption_dropout, shuffle_tags) -> io.NodeOutput:
        return io.NodeOutput(Augmentation(flip, color_jitter, views, caption_dropout, shuffle_tags))


class RegularisationSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.REGULARISATION,
            display_name="Regularisation Set",
            category=sockets.Category.DATASET,
            description="Marks a dataset as regularisation: generic photos of the class (ai-toolkit's is_reg "
                        "sets, e.g. 'person') that keep the model from turning every person into your subject. "
                        "Their captions train as written: the trigger word is never added (only where a caption "
                        "says [trigger]), and caption dropout keeps the class word. Chain it into the subject's "
                        "dataset through `previous`.",
            inputs=[
                sockets.Dataset.Input("dataset", tooltip="Generic class photos: a folder with default_caption "
                                                         "'person', or Class Images."),
                io.Float.Input("loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How much these images count in the loss compared with the subject's "
                                       "(DreamBooth's prior-preservation weight; 1.0 is usual, 0.5 gentler)."),
                io.Float.Input("network_weight", default=1.0, min=-2.0, max=2.0, step=0.05, optional=True,
                               tooltip=NETWORK_WEIGHT_TIP),
            ],
            outputs=[sockets.Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset, loss_weight, network_weight=1.0) -> io.NodeOutput:
        return io.NodeOutput(dataset.with_items(regularisation=True, loss_weight=loss_weight,
                                                network_weight=network_weight))


class DatasetReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=ids.DATASET_REPORT,
            display_name="Dataset Report",
            category=sockets.Category.DATASET,
            description="Looks at a dataset before training: counts, the bucket histogram, every caption, and "
                        "warnings (duplicates, photos too small for their bucket, captions without the trigger "
                        "word, captions longer than CLIP reads).",
            is_output_node=True,
            inputs=[sockets.Dataset.Input("dataset",
                                          tooltip="A dataset node's output, before it goes to the Train node.")],
            outputs=[io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, dataset) -> io.NodeOutput:
        text, _ = dataset_report.report(dataset)
        return io.NodeOutput(text, ui={"text": [text]})
