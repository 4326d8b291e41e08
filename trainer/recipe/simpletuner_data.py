"""SimpleTuner's data backends (multidatabackend.json: a list of datasets) read as our dataset section.

Each image dataset gives its folder (or a regularisation folder) and its resolution; our recipe
trains every folder at every resolution. The other settings (crop, repeats, captions) are one
value for all folders here: the first dataset's is used, and a later dataset that differs is
reported unsupported by its key. A setting a dataset leaves out comes from config.json's flag of
the same name (`--resolution`), as in SimpleTuner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .importing import Mapping, our_keys
from .simpletuner_files import Place, number, truthy

BACKEND_DEFAULTS = ("resolution", "resolution_type", "minimum_image_size", "maximum_image_size",
                    "target_downsample_size", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
                    "only_instance_prompt")
HOUSEKEEPING = ("id", "type", "cache_dir_vae", "metadata_backend", "vae_cache_clear_each_epoch", "skip_file_discovery",
                "preserve_data_backend_cache", "hash_filenames", "text_embeds", "image_embeds", "ignore_epochs",
                "scan_for_errors", "vae_cache_ondemand", "vae_cache_disable", "metadata_update_interval",
                "is_regularisation_data", "disabled", "disable")
CAPTIONS = {"textfile": "txt", "filename": "filename"}
ONE_PROMPT = ("instanceprompt", "instance_prompt")


@dataclass
class Claim:
    key: str | None  # the file's key (None: SimpleTuner's default, in no file)
    ours: str | None  # our key it sets; None: what this pack does anyway
    value: Any = None
    note: str | None = None
    why: str | None = None  # unsupported, and why


def pixels(value: Any, kind: str) -> tuple[int | None, str | None]:
    """A SimpleTuner resolution as our size in pixels (bucket area ≈ size²), and what changed."""
    v = number(value)
    if v is None or v <= 0:
        return None, f"{value!r} is not a size"
    if kind == "area":
        px = round(math.sqrt(v * 1e6) / 64) * 64
        return max(64, px), f"{v:g} megapixels is about {px}×{px} here"
    px = max(64, round(v / 16) * 16)
    changed = f"; {v:g} is rounded to {px} (a multiple of 16)" if px != v else ""
    if kind == "pixel":
        return px, f"SimpleTuner's pixel is the shorter side; here size² is the area (alike for square crops){changed}"
    return px, changed.lstrip("; ") or None


def read_backends(m: Mapping, name: str | None, backends: list, defaults: dict[str, tuple[str, Any]],
                  place: Place) -> set[str]:
    """The datasets of a backend list (none: config.json's flags alone); returns the flags used."""
    used: set[str] = set()
    claims: list[Claim] = []
    folders: dict[str, list[tuple[str, str]]] = {"dataset.folders": [], "dataset.regularisation": []}
    sizes: list[tuple[str | None, int, str]] = []  # (key, size, folder)
    several = len(backends) > 1
    for i, backend in enumerate(backends or [{}]):
        where = f"{name}[{i}]" if several else name
        if not isinstance(backend, dict):
            m.drop(str(where), f"{backend!r} is not a dataset ({{\"id\": …, \"instance_data_dir\": …}}).")
            continue

        def get(field: str, backend=backend, where=where) -> tuple[str | None, Any]:
            if field in backend:
                return f"{where}.{field}", backend[field]
            if field in defaults:
                used.add(field)
                return defaults[field]
            return None, None

        kind = str(backend.get("dataset_type", "image"))
        if truthy(backend.get("disabled", backend.get("disable"))) or kind in ("text_embeds", "image_embeds"):
            for field in backend:
                m.same(f"{where}.{field}")
            m.notes.append(f"{where}: " + (f"SimpleTuner's {kind} cache; this pack encodes and caches them itself."
                                           if kind != "image" else "disabled, so left out, as in SimpleTuner."))
        elif kind != "image":
            m.drop(str(where), f"dataset_type {kind}: this pack trains on folders of photos.")
        elif str(backend.get("type", "local")) != "local":
            m.drop(str(where), f"type {backend['type']}: this pack reads photos from a local folder; copy them into "
                               "one and use type local.")
        else:
            _image(get, place, claims, folders, sizes)
            for field in HOUSEKEEPING:
                if field in backend:
                    m.same(f"{where}.{field}")
            if "probability" in backend:
                if number(backend["probability"]) == 1:
                    m.same(f"{where}.probability")
                else:
                    m.drop(f"{where}.probability", "this pack draws every folder alike (repeats weigh them).")
    settle(m, claims)
    _folders_and_sizes(m, folders, sizes)
    return used


def _image(get, place: Place, claims: list[Claim], folders: dict, sizes: list) -> None:
    """One image dataset's settings, as claims on our keys."""
    reg = truthy(get("is_regularisation_data")[1])
    key, folder = get("instance_data_dir")
    if key and folder:
        folders["dataset.regularisation" if reg else "dataset.folders"].append((key, place.ours(str(folder))))
    rkey, rvalue = get("resolution")
    tkey, tvalue = get("resolution_type")
    kind = str(tvalue or "pixel_area")
    if kind not in ("pixel", "area", "pixel_area"):
        claims.append(Claim(tkey, None, why=f"{kind!r}: choose pixel, area or pixel_area; read as pixel_area."))
        kind = "pixel_area"
    px, note = pixels(1024 if rvalue is None else rvalue, kind)
    if px is None:
        claims.append(Claim(rkey, None, why=f"{note}; give the training size, e.g. 1024."))
    else:
        sizes.append((rkey, px, str(folder)))
        if tkey:
            claims.append(Claim(tkey, None, note=note))
    crop = _crop(get, claims)
    _sizes(get, claims, rvalue, crop)
    _captions(get, claims, reg)
    key, value = get("repeats")
    if key and number(value) is not None:
        if not reg:
            claims.append(Claim(key, "dataset.repeats", int(number(value)) + 1,
                                "SimpleTuner's repeats N shows each photo N + 1 times; here repeats is that count"))
        elif number(value) == 0:
            claims.append(Claim(key, None))
        else:
            claims.append(Claim(key, None, why="regularisation photos appear once per epoch here."))


def _crop(get, claims: list[Claim]) -> bool:
    ckey, crop = get("crop")
    akey, aspect = get("crop_aspect")
    skey, style = get("crop_style")
    if not truthy(crop):
        if ckey:
            claims.append(Claim(ckey, "dataset.bucketing", True))
        claims += [Claim(k, None, note="used only with crop true") for k in (akey, skey) if k]
        return False
    aspect, style = str(aspect or "square"), str(style or "random")  # SimpleTuner's defaults
    claims.append(Claim(ckey, None))
    if "dataset.crop_aspect" in our_keys():
        claims.append(Claim(akey or ckey, "dataset.crop_aspect", aspect))
    elif aspect in ("square", "preserve", "closest", "random"):
        nearest = {"closest": "nearest: the bucket closest to the photo's shape",
                   "random": "nearest: the bucket closest to the photo's shape, not a random one"}.get(aspect)
        claims.append(Claim(akey or ckey, "dataset.bucketing", aspect != "square", nearest))
    else:
        claims.append(Claim(akey, None, why=f"{aspect!r}: choose square, preserve, closest or random."))
    nearest = None if style in ("center", "random") else f"nearest: {style} cropping is center cropping here"
    claims.append(Claim(skey or ckey, "dataset.crop", style if nearest is None else "center", nearest))
    return True


def _sizes(get, claims: list[Claim], resolution: Any, crop: bool) -> None:
    """minimum_image_size, maximum_image_size and target_downsample_size."""
    key, value = get("minimum_image_size")
    if key:
        claims.append(Claim(key, "dataset.minimum_image_size", value) if number(value) else Claim(key, None))
    mkey, maximum = get("maximum_image_size")
    tkey, target = get("target_downsample_size")
    if not number(maximum):
        claims += [Claim(k, None, note="used only with maximum_image_size" if k == tkey else None)
                   for k in (mkey, tkey) if k]
        return
    res = number(1024 if resolution is None else resolution)
    if res is not None and number(target) == res and (number(maximum) <= res or not crop):
        claims.append(Claim(mkey, None, note="larger photos are resized to the training size, as here"))
        if tkey:
            claims.append(Claim(tkey, None))
    else:
        claims.append(Claim(mkey, "dataset.maximum_image_size", maximum))
        if tkey:
            claims.append(Claim(tkey, "dataset.target_downsample_size", target))


def _captions(get, claims: list[Claim], reg: bool) -> None:
    skey, strategy = get("caption_strategy")
    pkey, prompt = get("instance_prompt")
    prepend_key, prepend = get("prepend_instance_prompt")
    only_key, only = get("only_instance_prompt")
    strategy = str(strategy or "")
    one_prompt = strategy in ONE_PROMPT or truthy(only)
    if strategy in CAPTIONS:
        claims.append(Claim(skey, "dataset.captions", CAPTIONS[strategy]))
    elif strategy in ONE_PROMPT:
        claims.append(Claim(skey, None, note="nearest: photos without a caption file get instance_prompt (a photo "
                                             "with a .txt caption keeps it)"))
    elif skey:
        claims.append(Claim(skey, None, why=f"caption_strategy {strategy!r}: this pack reads .txt captions "
                                            "(textfile), file names (filename) or instanceprompt."))
    if pkey and prompt:
        if reg:
            claims.append(Claim(pkey, None, why="regularisation photos never carry the trigger here; their captions "
                                                "come from their .txt files, else dataset.class_word."))
        else:
            told = (None if one_prompt or truthy(prepend) else
                    "SimpleTuner puts it in no caption (prepend_instance_prompt is off); here it is the trigger "
                    "word, put first into captions that lack it")
            claims.append(Claim(pkey, "dataset.trigger", str(prompt).strip(), told))
            if one_prompt:
                claims.append(Claim(pkey, "dataset.default_caption", str(prompt).strip()))
    claims += [Claim(k, None) for k in (prepend_key, only_key) if k]


def settle(m: Mapping, claims: list[Claim]) -> None:
    """Each of our keys from its first claim; a later claim that agrees is honoured, one that differs
    is unsupported (our recipe has one value for every folder)."""
    first: dict[str, Claim] = {}
    for c in claims:
        if c.key is None or (not c.why and any(u.key == c.key for u in m.unsupported)):
            continue  # SimpleTuner's default, or a key already unsupported
        note = c.note if c.note and not any(n.endswith(f": {c.note}") for n in m.notes) else None
        if c.why:
            _refuse(m, c.key, c.why)
        elif c.ours is None or (c.ours in first and c.value == first[c.ours].value):
            m.same(c.key, note)
        elif c.ours not in our_keys():
            m.set(c.key, c.ours, c.value)  # unsupported by itself, naming the key it would be
        elif c.ours in first:
            was = first[c.ours]
            _refuse(m, c.key, f"it gives {c.ours} {c.value!r}, {was.key} gives {was.value!r}: this pack has one "
                              f"{c.ours} for every folder.")
        else:
            first[c.ours] = c
            m.set(c.key, c.ours, c.value, note=note)


def _refuse(m: Mapping, key: str, why: str) -> None:
    """A key unsupported after all (another of its claims may have honoured it)."""
    if key in m.honoured:
        m.honoured.remove(key)
    m.drop(key, why)


def _folders_and_sizes(m: Mapping, folders: dict, sizes: list) -> None:
    for ours, found in folders.items():
        paths = list(dict.fromkeys(path for _, path in found))
        for n, (key, _) in enumerate(found):
            m.set(key, ours, paths) if n == 0 else m.same(key)
    resolution = list(dict.fromkeys(px for _, px, _ in sizes))
    keys = [key for key, _, _ in sizes if key]
    if keys:
        m.set(keys[0], "dataset.resolution", resolution)
        for key in keys[1:]:
            m.same(key)
    elif sizes:
        m.settings["dataset.resolution"] = resolution
        m.notes.append("SimpleTuner's default resolution 1024 (set in no file) is used.")
    pairs = {(folder, px) for _, px, folder in sizes}
    if len(resolution) > 1 and len(pairs) < len({f for f, _ in pairs}) * len(resolution):
        m.notes.append(f"dataset.resolution: every folder trains at every size here ({resolution}).")
