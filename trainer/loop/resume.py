"""What a checkpoint records about its dataset, to notice on resume that the photos changed."""

from __future__ import annotations

import hashlib

from ..data.encode import Example


def example_key(e: Example) -> str:
    """What identifies an example across processes: its image content (the encode cache's key),
    caption, repeats and shape; a checkpoint records these to notice a changed dataset."""
    parts = [e.key or e.source, e.caption, e.repeats, e.loss_weight, list(e.latents.shape)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def dataset_change(saved: list[str], current: list[Example]) -> str:
    """'' when the examples are the ones a checkpoint was trained on, else what changed."""
    keys = [example_key(e) for e in current]
    if keys == saved:
        return ""
    added = [e.source or f"example {i}" for i, (e, k) in enumerate(zip(current, keys)) if k not in set(saved)]
    removed = len([k for k in saved if k not in set(keys)])
    what = [f"{len(added)} added" + (f" ({', '.join(added[:5])}{', …' if len(added) > 5 else ''})" if added else ""),
            f"{removed} removed"] if added or removed else ["reordered or re-captioned"]
    return (f"The dataset changed since the checkpoint ({len(saved)} examples then, {len(keys)} now: "
            f"{'; '.join(what)}); training continues on the current examples with a fresh shuffle, "
            "from the checkpoint's step, optimizer and LoRA.")
