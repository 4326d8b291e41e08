import pytest
from PIL import Image
from tiny_vlms import blip, llava

from trainer.data import captioning
from trainer.data.datasets import DatasetError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"blip": blip(root / "vlm" / "tiny-blip"), "llava": llava(root / "vlm" / "tiny-llava")}


def photos(folder, n=3):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (64 + 8 * i, 48), (60 * i, 120, 200)).save(folder / f"{i}.jpg")
    return folder


def test_captions_go_into_sidecars_trigger_and_class_first(models, tmp_path):
    folder = photos(tmp_path / "dog")
    (folder / "1.txt").write_text("my own caption of sks")
    captioner = captioning.Captioner(models["blip"])
    result = captioning.caption_folder(folder, captioner, "short", "sks", "dog")
    assert [(n, written) for n, _, written in result] == [("0.jpg", True), ("1.jpg", False), ("2.jpg", True)]
    assert (folder / "1.txt").read_text() == "my own caption of sks"  # kept
    for name in ("0", "2"):
        text = (folder / f"{name}.txt").read_text().strip()
        assert text.startswith("sks dog, ") and "\n" not in text and len(text) > len("sks dog, ")
    again = captioning.caption_folder(folder, captioner, "short", "sks", "dog", overwrite=True, skip={"2.jpg"})
    assert [written for _, _, written in again] == [True, True, False]
    assert (folder / "1.txt").read_text().startswith("sks dog, ")  # overwritten when asked


def test_reference_photo_needs_a_chat_model_and_works_with_one(models, tmp_path):
    folder = photos(tmp_path / "me", 2)
    reference = Image.new("RGB", (64, 64), (200, 150, 120))
    with pytest.raises(ValueError, match="reference photo needs a chat model"):
        captioning.caption_folder(folder, captioning.Captioner(models["blip"]), reference=reference)
    chat = captioning.Captioner(models["llava"])
    result = captioning.caption_folder(folder, chat, "detailed", "sks", "man", reference=reference)
    assert all(written and text.startswith("sks") for _, text, written in result)
    seen = []
    processor = chat.processor

    class Spy:  # what the model is shown
        def __call__(self, **kwargs):
            seen.append(kwargs)
            return processor(**kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    chat.processor = Spy()
    chat.caption(Image.open(folder / "0.jpg"), "short", reference, "sks man")
    chat.caption(Image.open(folder / "0.jpg"), "short")
    assert [len(s["images"]) for s in seen] == [2, 1] and seen[0]["images"][0] is reference
    assert "Image 1 is a reference photo of sks man" in seen[0]["text"][0]
    assert "reference" not in seen[1]["text"][0]


def test_edits_are_written_and_checked(tmp_path):
    folder = photos(tmp_path / "e", 2)
    (folder / "0.txt").write_text("old")
    edits = captioning.parse_edits("0.jpg: sks dog on grass\n\n1.jpg: sks dog in snow\n")
    assert captioning.apply_edits(folder, edits) == ["0.jpg", "1.jpg"]
    assert (folder / "0.txt").read_text().strip() == "sks dog on grass"
    assert captioning.apply_edits(folder, edits) == []  # nothing changed the second time
    with pytest.raises(DatasetError, match="not in .*: missing.jpg"):
        captioning.apply_edits(folder, {"missing.jpg": "x"})
    with pytest.raises(DatasetError, match="line 1"):
        captioning.parse_edits("no colon here")


def test_clean_removes_preambles():
    assert captioning.clean('  "Caption: a dog\n on grass" ') == "a dog on grass"
    assert captioning.clean("Here is a short caption for the photo: sks on a beach") == "sks on a beach"
