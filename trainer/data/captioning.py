"""Captions written by a local vision-language model (transformers), as the recipes our users
bring do it: short and simple (mflux), or detailed, the trigger word and class first
(ai-toolkit's `kvthvmi_ person, …`), and, with a reference photo of the subject, where the
subject is and what differs from the reference.

Works with the image-to-text models transformers loads with AutoModelForImageTextToText: chat
models (Qwen2-VL / Qwen2.5-VL, JoyCaption and other LLaVA models) and BLIP, Florence-2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .. import files
from . import folders, images
from .captions import subject_words, with_trigger
from .datasets import DatasetError

STYLES = ("short", "detailed")
PROMPTS = {
    "short": "Write a short caption for this photo: one sentence of at most 15 words saying what the main subject "
             "is and where. No preamble.",
    "detailed": "Describe this photo in one detailed paragraph: the main subject, pose, clothing, expression, the "
                "setting, lighting and framing. No preamble.",
}
REFERENCE = ("Image 1 is a reference photo of {subject}. Image 2 is the photo to caption. Write one caption for "
             "image 2 that starts with \"{subject}\". If other people are present, mention them but focus on "
             "{subject}, and say where {subject} is in the frame (left, center, right). Say if glasses, "
             "sunglasses or a beard differ from the reference. {style}")
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<MORE_DETAILED_CAPTION>"}


def clean(text: str) -> str:
    """One line, without quotes or a 'Caption:' preamble."""
    text = " ".join(text.split()).strip().strip("\"'")
    return re.sub(r"^(here is a |a )?(short |detailed )?caption( for (this|the) (photo|image))?\s*[:\-]\s*", "",
                  text, flags=re.IGNORECASE).strip()


class Captioner:
    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_new_tokens: int = 80):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json: put a transformers model folder there "
                                    "(e.g. Florence-2, BLIP, Qwen2-VL, JoyCaption).")
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        model_type = AutoConfig.from_pretrained(model_dir).model_type
        self.kind = ("chat" if getattr(self.processor, "chat_template", None)
                     else "florence" if model_type.startswith("florence") else "plain")
        self.device, self.max_new_tokens = torch.device(device), max_new_tokens

    @torch.no_grad()
    def caption(self, image: Image.Image, style: str = "short", reference: Image.Image | None = None,
                subject: str = "the subject") -> str:
        if style not in STYLES:
            raise ValueError(f"style is {style!r}; choose {' or '.join(STYLES)}.")
        if reference is not None and self.kind != "chat":
            raise ValueError("A reference photo needs a chat model that reads two images (Qwen2-VL, JoyCaption / "
                             "LLaVA); BLIP and Florence-2 caption one photo at a time.")
        if self.kind == "chat":
            instruction = REFERENCE.format(subject=subject, style=PROMPTS[style]) if reference else PROMPTS[style]
            shown = [reference, image] if reference is not None else [image]
            content = [{"type": "image"} for _ in shown] + [{"type": "text", "text": instruction}]
            text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
            inputs = self.processor(text=[text], images=shown, return_tensors="pt")
        elif self.kind == "florence":
            inputs = self.processor(text=FLORENCE_TASKS[style], images=image, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        inputs = {k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        limit = self.max_new_tokens if style == "detailed" else min(self.max_new_tokens, 40)
        out = self.model.generate(**inputs, max_new_tokens=limit, do_sample=False)
        prompt = inputs.get("input_ids")
        if prompt is not None and out.shape[1] > prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt):
            out = out[:, prompt.shape[1]:]  # decoder-only models repeat the prompt
        return clean(self.processor.batch_decode(out, skip_special_tokens=True)[0])


def caption_folder(folder: str | Path, captioner: Captioner, style: str = "short", trigger_word: str = "",
                   class_word: str = "", reference: Image.Image | None = None, overwrite: bool = False,
                   skip: set[str] = frozenset(), on_progress: Callable[[int, int], None] | None = None
                   ) -> list[tuple[str, str, bool]]:
    """Caption every image of `folder` into a same-name .txt (kept unless `overwrite`; names in
    `skip` are left alone). Returns (file name, caption, newly written) for each image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Folder {folder} does not exist.")
    found = folders.list_folder(folder).photos  # regular files only, hidden ones left alone
    if not found:
        raise DatasetError(f"{folder} holds no images ({', '.join(images.EXTENSIONS)}).")
    subject = subject_words(trigger_word, class_word) or "the subject"
    results = []
    for n, image in enumerate(found):
        txt = image.with_suffix(".txt")
        if image.name in skip or (txt.is_file() and not overwrite):
            results.append((image.name, txt.read_text(encoding="utf-8-sig").strip() if txt.is_file() else "", False))
        else:
            text = with_trigger(captioner.caption(images.open_rgb(image), style, reference, subject), trigger_word,
                                class_word)
            files.write_text(txt, text + "\n")
            results.append((image.name, text, True))
        if on_progress:
            on_progress(n + 1, len(found))
    return results


def parse_edits(text: str) -> dict[str, str]:
    """'photo.jpg: a caption' per line -> {'photo.jpg': 'a caption'}."""
    edits = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition(":")
        if not sep or not name.strip():
            raise DatasetError(f"edited_captions line {number} ({line.strip()[:40]!r}) is not 'file name: caption'.")
        edits[name.strip()] = caption.strip()
    return edits


def apply_edits(folder: str | Path, edits: dict[str, str]) -> list[str]:
    """Write the edited captions whose text differs from the file's; returns the names written."""
    folder = Path(folder)
    unknown = [n for n in edits if not (folder / n).is_file()]
    if unknown:
        raise DatasetError(f"edited_captions names images that are not in {folder}: {', '.join(unknown)}.")
    written = []
    for name, caption in edits.items():
        txt = (folder / name).with_suffix(".txt")
        if not txt.is_file() or txt.read_text(encoding="utf-8-sig").strip() != caption:
            files.write_text(txt, caption + "\n")
            written.append(name)
    return written
