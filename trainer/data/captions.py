"""Caption text: the trigger word and class put into a caption, captions from file names, and
shuffled versions of tag-style captions."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

TRIGGER_PLACEHOLDER = "[trigger]"
_NUMBERED = re.compile(r"\[trigger(\d*)\]")


def subject_words(trigger_word: str, class_word: str = "") -> str:
    """'sks' + 'dog' -> 'sks dog': the words that name a subject (and that caption dropout keeps)."""
    return f"{trigger_word.strip()} {class_word.strip()}".strip()


def with_trigger(caption: str, trigger_word: str, class_word: str = "") -> str:
    """Put the trigger word in the caption: replace `[trigger]`, or prepend it with the class when
    missing (ai-toolkit's convention: `kvthvmi_ person, …`)."""
    caption = caption.strip()
    if not trigger_word:
        return caption.replace(TRIGGER_PLACEHOLDER, "").strip()
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger_word)
    if re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption):  # as a word: "asks" is not "sks"
        return caption
    prefix = subject_words(trigger_word, class_word)
    return f"{prefix}, {caption}" if caption else prefix


def preservation_caption(caption: str, trigger_word: str, class_word: str, written_class: str = "") -> str:
    """The caption differential output preservation (ai-toolkit's diff_output_preservation) asks
    the frozen model about: every trigger word (as a word) replaced by the class word, 'a photo of
    sks, smiling' -> 'a photo of person, smiling'. A class word right after the trigger is not
    doubled: 'sks person' -> 'person', not 'person person'; `written_class` (the dataset's class
    word, when DOP is told another) counts as one too: 'sks person' with class 'man' -> 'man'."""
    trigger, word = trigger_word.strip(), class_word.strip()
    if not trigger or not word:
        return caption
    classes = sorted({w for w in (word, written_class.strip()) if w}, key=len, reverse=True)  # longest first
    follow = "|".join(re.escape(w) for w in classes)
    pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)(?:\s+((?i:{follow}))(?!\w))?")

    def replaced(match: re.Match) -> str:  # a following class word as written ('sks Person' -> 'Person')
        written = match.group(1)
        return written if written and written.lower() == word.lower() else word

    return pattern.sub(replaced, caption)


def fill_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """A validation prompt with `[trigger]` (or `[trigger1]`) the first subject's trigger word,
    `[trigger2]` the second's, and so on, in the order the subjects were chained."""
    def one(match: re.Match) -> str:
        n = int(match.group(1) or 1)
        if n == 1 and not triggers:
            return ""
        if not 1 <= n <= len(triggers):
            names = ", ".join(f"[trigger{i + 1 if i else ''}] = {t}" for i, t in enumerate(triggers))
            raise ValueError(f"The prompt {prompt!r} names {match.group(0)}, but the dataset has {len(triggers)} "
                             f"subject(s) with a trigger word ({names or 'none'}).")
        return triggers[n - 1]
    return _NUMBERED.sub(one, prompt)


def caption_from_filename(path: Path) -> str:
    """'sks_dog_on_grass (2).jpg' -> 'sks dog on grass'."""
    stem = re.sub(r"\s*\(\d+\)$|[_\-\s]+\d+$", "", path.stem)
    return re.sub(r"[_\-]+", " ", stem).strip()


def shuffled_tags(caption: str, keep: int, count: int, seed: int) -> list[str]:
    """`count` versions of a tag-style caption with its tags shuffled, the first `keep` in place."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if len(tags) <= keep + 1:
        return []
    rng, out = random.Random(seed), []
    for _ in range(count):
        rest = tags[keep:]
        rng.shuffle(rest)
        out.append(", ".join(tags[:keep] + rest))
    return [c for c in dict.fromkeys(out) if c != caption]
