"""An ai-toolkit process's `datasets` read as our recipe (see `reader`).

Datasets with `is_reg: true` become `dataset.regularisation`, the others `dataset.folders`. Our
recipe has one set of dataset settings for all its subject folders: they come from the first
subject dataset, and a note names each other dataset's setting that differs (it can't be kept
apart). Regularisation photos train at the subject's sizes, as they are (no dropout, flips or
repeats); their `default_caption` becomes `dataset.class_word`, which is what their photos
without a caption train on here.
"""

from __future__ import annotations

from typing import Any, Callable

from .job import Job, item, join, num


def _sizes(value: Any) -> list:
    return [int(num(v)) if isinstance(num(v), float) and num(v).is_integer() else v
            for v in (value if isinstance(value, list) else [value])]


def _caption_ext(value: Any) -> str:
    return str(value or "txt").strip().lstrip(".")


# ai-toolkit key -> (our key, ai-toolkit's default, ai-toolkit's value as ours)
SUBJECT: dict[str, tuple[str, Any, Callable]] = {
    "default_caption": ("dataset.default_caption", None, lambda v: "" if v is None else str(v)),
    "caption_dropout_rate": ("dataset.caption_dropout", 0.0, num),
    "resolution": ("dataset.resolution", 512, _sizes),
    "num_repeats": ("dataset.repeats", 1, lambda v: int(num(v)) if isinstance(num(v), float) else v),
    "flip_x": ("dataset.flip", False, bool),
    "buckets": ("dataset.bucketing", True, bool),
    "random_crop": ("dataset.crop", False, lambda v: "random" if v else "center"),
    "caption_ext": ("dataset.caption_ext", "txt", _caption_ext),
    "shuffle_tokens": ("dataset.shuffle_tags", False, bool),
    "network_weight": ("dataset.network_weight", 1.0, num),
}
PLANNED: dict[str, tuple[str, Any, Callable]] = {}  # keys whose setting this pack does not have yet
AS_THEY_ARE = {"caption_dropout_rate": 0.0, "num_repeats": 1, "flip_x": False}  # regularisation photos here
UNLESS_DEFAULT = {  # honoured at these values, with why any other is not
    "flip_y": ((False,), "photos are mirrored left–right only here (dataset.flip)"),
    "token_dropout_rate": ((0, 0.0), "caption words don't drop out here (dataset.caption_dropout drops captions)"),
    "random_triggers": (([],), "random trigger words are not added here"),
    "mask_path": ((None, ""), "masked loss is not done here"),
    "alpha_mask": ((False,), "masked loss is not done here"),
    "controls": (([],), "ai-toolkit's generated controls (depth, pose…) are not made here; give the control "
                        "images as control_path"),
    "inpaint_path": ((None, ""), "inpainting is not trained here"),
    "type": (("image",), "this pack trains on image folders"),
    "random_scale": ((False,), "random scaling is not done here"),
    "scale": ((1, 1.0), "photos are not scaled before bucketing here"),
    "square_crop": ((False,), "photos keep their aspect ratio here (dataset.bucketing)"),
    "augments": (([],), "augmentations other than dataset.flip are not done here"),
    "augmentations": ((None, []), "augmentations other than dataset.flip are not done here"),
    "num_frames": ((1,), "this pack trains on still images"),
    "loss_multiplier": ((1, 1.0), "a per-dataset loss weight is not here (dataset.regularisation_weight is, for "
                                  "regularisation sets)"),
}
SAME = ("cache_latents", "cache_latents_to_disk", "cache_text_embeddings", "num_workers", "prefetch_factor",
        "bucket_tolerance", "is_reg", "keep_tokens")


def read_datasets(job: Job, datasets: list[dict], base: str, trigger: Any) -> None:
    m = job.m
    keys = [item(base, datasets, i) for i in range(len(datasets))]
    subjects = [(k, d) for k, d in zip(keys, datasets) if not d.get("is_reg")]
    regs = [(k, d) for k, d in zip(keys, datasets) if d.get("is_reg")]
    folders = {"dataset.folders": [], "dataset.regularisation": []}
    for ours, group in (("dataset.folders", subjects), ("dataset.regularisation", regs)):
        for key, d in group:
            name = "folder_path" if "folder_path" in d else "dataset_path"
            if d.get(name) is None:
                m.drop(key, "no folder_path: nothing to train on")
                continue
            folders[ours].append(job.path(join(key, name), d[name]))
            job.set(join(key, name), ours, list(folders[ours]))
            m.origins[f"{ours}[{len(folders[ours]) - 1}]"] = join(key, name)
        if folders[ours]:
            m.origins[ours] = m.origins[f"{ours}[0]"]
    _controls(job, subjects, regs)
    first = subjects[0][1] if subjects else {}
    mine = {name: conv(first.get(name, default)) for name, (_, default, conv) in {**SUBJECT, **PLANNED}.items()}
    for i, (key, d) in enumerate(subjects):
        for name, (ours, default, conv) in SUBJECT.items():
            if i == 0 and name in d:
                note = _dropout_note(d) if name == "caption_dropout_rate" else None
                job.set(join(key, name), ours, conv(d[name]), note)
            elif i == 0:
                job.default(ours, conv(default), name)
            elif name in d:
                _same_or_differs(job, join(key, name), conv(d[name]), mine[name], join(subjects[0][0], name))
        if i == 0 and first.get("default_caption") is None:
            m.notes.append(f"{key}: no default_caption: ai-toolkit trains a photo without a caption file on the "
                           "trigger word alone; here a missing caption stops training (set dataset.default_caption).")
    for key, d in regs:
        caption = d.get("default_caption")
        if caption:
            if m.settings.get("dataset.class_word", caption) == caption:
                job.set(join(key, "default_caption"), "dataset.class_word", str(caption),
                        "regularisation photos without a caption train on dataset.class_word here.")
            else:
                m.note(join(key, "default_caption"), f"differs from the other regularisation set's "
                       f"({m.settings['dataset.class_word']!r}): this pack has one dataset.class_word.")
        elif "default_caption" in d:
            m.same(join(key, "default_caption"))
        if "network_weight" in d:  # the LoRA's multiplier on the regularisation photos: their own setting
            reg_weight = m.settings.get("dataset.regularisation_network_weight", num(d["network_weight"]))
            if reg_weight == num(d["network_weight"]):
                job.set(join(key, "network_weight"), "dataset.regularisation_network_weight", reg_weight)
            else:
                _same_or_differs(job, join(key, "network_weight"), num(d["network_weight"]), reg_weight,
                                 "the other regularisation set's")
        for name, (ours, default, conv) in SUBJECT.items():
            if name == "network_weight":
                continue
            if name in d and name in AS_THEY_ARE:
                job.only(join(key, name), conv(d[name]), (AS_THEY_ARE[name],),
                         "regularisation photos are used as they are here (no caption dropout, repeats or flips)")
            elif name in d and name != "default_caption":
                _same_or_differs(job, join(key, name), conv(d[name]), mine[name], "the subject's")
    for key, d in subjects + regs:
        _common(job, key, d, trigger, mine)


def _controls(job: Job, subjects: list, regs: list) -> None:
    """Subject datasets' `control_path` (edit pairs for FLUX.1 Kontext) as dataset.control_path, one
    per folder: all of them paired, or none."""
    m = job.m
    given = [(key, d) for key, d in subjects if d.get("folder_path", d.get("dataset_path")) is not None]
    paths = [(key, d.get("control_path")) for key, d in given]
    paths = [(key, p[0] if isinstance(p, list) and len(p) == 1 else p) for key, p in paths]
    for key, d in regs:
        if d.get("control_path"):
            m.drop(join(key, "control_path"), "regularisation sets train without control images here")
    if not any(p for _, p in paths):
        for key, p in paths:
            if p is not None:
                m.same(join(key, "control_path"))
        return
    bad = [(key, p) for key, p in paths if not p or isinstance(p, list)]
    if bad:
        for key, p in paths:
            m.drop(join(key, "control_path"), "several control images per photo are not trained here" if
                   isinstance(p, list) else "every subject dataset needs its control_path here (an edit LoRA "
                   "trains on pairs only)")
        return
    folders = []
    for key, p in paths:
        folders.append(job.path(join(key, "control_path"), p))
        job.set(join(key, "control_path"), "dataset.control_path", list(folders))
        m.origins[f"dataset.control_path[{len(folders) - 1}]"] = join(key, "control_path")
    m.origins["dataset.control_path"] = m.origins["dataset.control_path[0]"]


def _same_or_differs(job: Job, key: str, value: Any, used: Any, whose: str) -> None:
    if value == used:
        job.m.same(key)
    else:
        job.m.note(key, f"{value!r} differs from {whose} ({used!r}): this pack has one value for all its folders, "
                        f"so {used!r} it is here (make a recipe per dataset to keep them apart).")


def _dropout_note(d: dict) -> str | None:
    if not num(d.get("caption_dropout_rate", 0)):
        return None
    return ("ai-toolkit drops the whole caption; this pack keeps the trigger (and dataset.class_word) when a "
            "caption drops out.")


def _common(job: Job, key: str, d: dict, trigger: Any, mine: dict) -> None:
    """The keys every dataset has alike: planned ones, ones honoured only at their default, the rest."""
    m = job.m
    for name, (ours, default, conv) in PLANNED.items():
        if name in d:
            job.planned(join(key, name), ours, conv(d[name]), conv(default))
    for name, (fine, why) in UNLESS_DEFAULT.items():
        if name in d:
            job.only(join(key, name), d[name], fine, why)
    for name in SAME:
        if name in d:
            m.same(join(key, name), "photos are encoded once, in memory, here." if name.startswith("cache_latents")
                   and d[name] else None)
    if "mask_min_value" in d:
        job.only(join(key, "mask_min_value"), d.get("mask_path") or None, (None,), "masked loss is not done here",
                 "used only with mask_path.")
    if d.get("trigger_word") is not None:
        own = str(d["trigger_word"])
        if d.get("is_reg") or (trigger is not None and own == str(trigger)):
            m.same(join(key, "trigger_word"), "regularisation photos never get the trigger here." if d.get("is_reg")
                   else None)
        elif "dataset.trigger" not in m.settings:
            job.set(join(key, "trigger_word"), "dataset.trigger", own)
        else:
            m.note(join(key, "trigger_word"), f"differs from {m.settings['dataset.trigger']!r}: this pack has one "
                                              "trigger for all its folders (dataset.trigger).")
