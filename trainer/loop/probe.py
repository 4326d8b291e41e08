"""Where a run measures its fixed-noise loss (steadier than the per-step loss): the subjects' own photos."""

from __future__ import annotations

import itertools

from ..data.encode import Example

PROBE_EXAMPLES = 4  # photos the fixed-noise loss is measured on


def probe_examples(examples: list[Example], count: int = PROBE_EXAMPLES) -> list[Example]:
    """Where the fixed-noise loss is measured: the subjects' own photos, never regularisation or
    class images, taken in turn from each subject (at least one of each) up to `count`."""
    by_subject: dict[str, list[Example]] = {}
    for e in examples:
        if not e.regularisation:
            by_subject.setdefault(e.subject, []).append(e)
    if not by_subject:  # only regularisation images: measure on those
        return examples[:count]
    in_turn = [e for group in itertools.zip_longest(*by_subject.values()) for e in group if e is not None]
    return in_turn[:max(count, len(by_subject))]
