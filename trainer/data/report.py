"""A look at a dataset before training: what is in it and what may go wrong."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from . import images
from .datasets import Dataset

CLIP_TOKENS = 77  # CLIP reads this many; T5 takes up to 512


def _tokens(caption: str) -> int:
    """A rough token count (words and punctuation), enough to flag captions CLIP will cut."""
    return len(re.findall(r"\w+|[^\w\s]", caption))


def report(dataset: Dataset) -> tuple[str, list[str]]:
    """(the report as text, its warnings)."""
    subjects = [i for i in dataset.items if not i.regularisation]
    regs = [i for i in dataset.items if i.regularisation]
    warnings = [f"left out: {s}" for s in dataset.skipped]

    by_content = defaultdict(list)
    for item in dataset.items:
        by_content[(item.content_key(), item.shaping.resolution)].append(item.name)
    warnings += [f"duplicate images: {', '.join(names)}" for names in by_content.values() if len(names) > 1]

    histogram: dict[int, Counter] = defaultdict(Counter)
    for item in dataset.items:
        w, h = (item.pixels.shape[1], item.pixels.shape[0]) if item.pixels is not None else images.size(item.image)
        full = images.pick_bucket(w, h, item.shaping.resolution, item.shaping.bucketing)
        try:
            bucket = item.shaping.bucket(w, h, item.name)
        except images.ImageProblem as e:
            warnings.append(f"{e} It can't train at this resolution")
            continue
        histogram[item.shaping.resolution][bucket] += 1
        if bucket != full:
            warnings.append(f"{item.name} is {w}×{h}, smaller than its {full[0]}×{full[1]} bucket: it trains at "
                            f"{bucket[0]}×{bucket[1]} (photos are never enlarged unless upscale_small)")
    subject_triggers = dataset.triggers
    for item in subjects:
        if _tokens(item.caption) > CLIP_TOKENS - 2:
            warnings.append(f"{item.name}: caption has about {_tokens(item.caption)} tokens; CLIP reads the first "
                            f"{CLIP_TOKENS} (mflux's advice: keep training prompts simple)")
    for item in regs:
        found = [t for t in subject_triggers if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", item.caption)]
        if found:
            warnings.append(f"{item.name}: this regularisation caption names the subject's trigger {found[0]!r}: "
                            "the trigger would learn to mean any image of the class; remove it from the caption")

    triggers = Counter(i.trigger or "(none)" for i in subjects)
    placeholders = ", ".join(f"[trigger{n + 1 if n else ''}] = {t}" for n, t in enumerate(subject_triggers))
    lines = [f"{len(dataset.items)} images: {len(subjects)} of subjects"
             + (f", {len(regs)} regularisation (loss weight {regs[0].loss_weight:g})" if regs else ""),
             "subjects: " + ", ".join(f"{t} ×{n}" for t, n in triggers.items())
             + (f" (validation prompts: {placeholders})" if placeholders else ""),
             "buckets:"]
    for resolution, buckets in sorted(histogram.items()):
        lines.append(f"  at {resolution}: " + ", ".join(f"{w}×{h} ×{n}" for (w, h), n in buckets.most_common()))
    lines.append("captions:")
    lines += [f"  {i.name}: {i.caption}" for i in dataset.items]
    lines.append(f"warnings ({len(warnings)}):" if warnings else "no warnings")
    lines += [f"  {w}" for w in warnings]
    return "\n".join(lines), warnings
