import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data import captions, datasets
from trainer.data.images import Shaping

QUICKSTART = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


def photo(path, size=(96, 80), color=(200, 40, 40), mode="RGB", **save):
    Image.new(mode, size, color).save(path, **save)
    return path


def caption(path, text):
    path.with_suffix(".txt").write_text(text)


def opts(**kw):
    return datasets.Options(**{"shaping": Shaping(64), **kw})


def test_folder_with_captions_trigger_and_class(tmp_path):
    caption(photo(tmp_path / "a.jpg"), "photo of [trigger] dog")
    caption(photo(tmp_path / "b.png"), "a dog in the park")
    caption(photo(tmp_path / "c.webp"), "sks dog, sitting")
    ds = datasets.from_folder(tmp_path, opts(trigger_word="sks", class_word="dog", repeats=3))
    assert [i.caption for i in ds.items] == ["photo of sks dog", "sks dog, a dog in the park", "sks dog, sitting"]
    assert {(i.repeats, i.trigger) for i in ds.items} == {(3, "sks dog")}


def test_trigger_word_must_appear_as_a_word():
    assert captions.with_trigger("a dog that asks for treats", "sks") == "sks, a dog that asks for treats"
    assert captions.with_trigger("photo of sks, dog", "sks") == "photo of sks, dog"
    assert captions.with_trigger("[trigger] on a beach", "") == "on a beach"
    assert captions.with_trigger("", "sks", "person") == "sks person"
    assert captions.with_trigger("smiling, outdoors", "kvthvmi_", "person") == "kvthvmi_ person, smiling, outdoors"


def test_every_bad_file_is_named_at_once_or_skipped(tmp_path):
    caption(photo(tmp_path / "good.jpg"), "sks")
    photo(tmp_path / "nocaption.png")
    (tmp_path / "notanimage.jpg").write_bytes(b"hello")
    caption(tmp_path / "notanimage.jpg", "x")
    full = photo(tmp_path / "full.jpg", size=(256, 256), quality=95)
    (tmp_path / "truncated.jpg").write_bytes(full.read_bytes()[:400])
    caption(tmp_path / "truncated.jpg", "x")
    full.unlink()
    with pytest.raises(datasets.DatasetError) as e:
        datasets.from_folder(tmp_path, opts())
    message = str(e.value)
    assert "3 problem(s)" in message and "good.jpg" not in message and "problems='skip'" in message
    assert "nocaption.png has no caption in nocaption.txt or a metadata file" in message
    assert "notanimage.jpg is not an image" in message and "truncated.jpg cannot be decoded" in message
    skipped = datasets.from_folder(tmp_path, opts(problems="skip"))
    assert [i.name for i in skipped.items] == ["good.jpg"] and len(skipped.skipped) == 3


def test_captions_from_metadata_and_file_names(tmp_path):
    photo(tmp_path / "sks_dog_on_grass (2).jpg")
    photo(tmp_path / "IMG_0001.jpg")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "IMG_0001.jpg", "text": "a dog"}) + "\n")
    with pytest.raises(datasets.DatasetError, match="sks_dog_on_grass \\(2\\).jpg has no caption"):
        datasets.from_folder(tmp_path, opts())
    by_name = datasets.from_folder(tmp_path, opts(captions="filename"))
    assert sorted(i.caption for i in by_name.items) == ["IMG", "sks dog on grass"]
    auto = datasets.from_folder(tmp_path, opts(default_caption="a photo"))
    assert {i.name: i.caption for i in auto.items} == {"IMG_0001.jpg": "a dog", "sks_dog_on_grass (2).jpg": "a photo"}
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nIMG_0001.jpg,a cat\n")
    assert datasets.read_metadata(tmp_path) == {"IMG_0001.jpg": "a cat"}
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.json").write_text(json.dumps({"IMG_0001.jpg": "a cow"}))
    assert datasets.read_metadata(tmp_path) == {"IMG_0001.jpg": "a cow"}
    (tmp_path / "metadata.json").write_text(json.dumps([{"picture": "x.jpg"}]))
    with pytest.raises(datasets.DatasetError, match="metadata.json can't be read as captions"):
        datasets.read_metadata(tmp_path)


def test_caption_encodings(tmp_path):
    photo(tmp_path / "bom.jpg")
    (tmp_path / "bom.txt").write_bytes("\ufeffsks dog".encode("utf-8"))
    photo(tmp_path / "latin.jpg")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 sks".encode("latin-1"))
    with pytest.raises(datasets.DatasetError, match="latin.txt is not UTF-8"):
        datasets.from_folder(tmp_path, opts())
    (tmp_path / "latin.txt").write_text("café sks", encoding="utf-8")
    captions = [i.caption for i in datasets.from_folder(tmp_path, opts(trigger_word="sks")).items]
    assert captions == ["sks dog", "café sks"]


def test_subfolders_are_concepts_with_their_own_trigger_class_and_repeats(tmp_path):
    for folder, text in (("10_sks dog", "on grass"), ("3_xyz cat", "on a sofa"), ("plain", "a toy")):
        (tmp_path / folder).mkdir()
        caption(photo(tmp_path / folder / "1.jpg"), text)
    ds = datasets.from_folder(tmp_path, opts(repeats=2), concepts=True)
    assert [(i.caption, i.repeats, i.trigger) for i in ds.items] == [
        ("sks dog, on grass", 10, "sks dog"), ("xyz cat, on a sofa", 3, "xyz cat"), ("plain, a toy", 2, "plain")]
    assert ds.triggers == ("sks", "xyz", "plain") and ds.trigger_word == "sks"  # one per subject, never joined


def test_datasets_chain_and_mark_regularisation(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    caption(photo(tmp_path / "a" / "1.jpg"), "a dog")
    photo(tmp_path / "b" / "1.jpg")
    subject = datasets.from_folder(tmp_path / "a", opts(trigger_word="sks"))
    reg = datasets.from_folder(tmp_path / "b", opts(default_caption="dog")).with_items(regularisation=True,
                                                                                   loss_weight=0.5)
    both = subject + reg
    assert [(i.caption, i.regularisation, i.loss_weight) for i in both.items] == [("sks, a dog", False, 1.0),
                                                                                  ("dog", True, 0.5)]


def test_a_regularisation_set_never_carries_the_subjects_trigger(tmp_path):
    """The folder node's default trigger 'sks' reaches a regularisation folder built as its tooltip says
    (default_caption 'person'): it must train on 'person', and caption dropout keep 'person', not 'sks'."""
    (tmp_path / "reg").mkdir()
    photo(tmp_path / "reg" / "1.jpg")
    caption(photo(tmp_path / "reg" / "2.jpg", color=(1, 2, 3)), "a photo of [trigger] in the rain")
    caption(photo(tmp_path / "reg" / "3.jpg", color=(4, 5, 6)), "a person, sks written on a wall")
    node_defaults = opts(trigger_word="sks", default_caption="person")
    reg = datasets.from_folder(tmp_path / "reg", node_defaults).with_items(regularisation=True, loss_weight=0.5)
    assert [i.caption for i in reg.items] == ["person", "a photo of sks in the rain", "a person, sks written on a wall"]
    assert {i.trigger for i in reg.items} == {""} and reg.triggers == ()  # dropout: the class word only (none here)
    classed = datasets.from_folder(tmp_path / "reg", opts(trigger_word="sks", class_word="person",
                                                          default_caption="person")).with_items(regularisation=True)
    assert classed.items[0].caption == "person" and classed.items[0].trigger == "person"
    (tmp_path / "me").mkdir()
    caption(photo(tmp_path / "me" / "1.jpg", color=(9, 9, 9)), "a photo")
    both = datasets.from_folder(tmp_path / "me", opts(trigger_word="ohwx", class_word="person")) + reg
    assert [i.caption for i in both.items][:2] == ["ohwx person, a photo", "person"]
    assert both.triggers == ("ohwx",)  # the regularisation set's 'sks' is no subject's trigger


def test_chained_subjects_keep_one_trigger_each():
    a = datasets.from_images(torch.rand(2, 64, 64, 3), ["photo of [trigger]"], opts(trigger_word="sks"))
    b = datasets.from_images(torch.rand(1, 64, 64, 3), ["photo"], opts(trigger_word="xyz", class_word="cat"))
    both = a + b
    assert both.triggers == ("sks", "xyz") and both.trigger_word == "sks"
    assert [i.caption for i in both.items] == ["photo of sks", "photo of sks", "xyz cat, photo"]
    assert captions.fill_triggers("a photo of [trigger] and [trigger2]", both.triggers) == "a photo of sks and xyz"
    assert captions.fill_triggers("[trigger1] alone", both.triggers) == "sks alone"
    with pytest.raises(ValueError, match=r"names \[trigger3\], but the dataset has 2 subject"):
        captions.fill_triggers("[trigger3] at the beach", both.triggers)
    assert captions.fill_triggers("a photo of [trigger]", ()) == "a photo of "  # a style without a trigger


def test_images_from_other_nodes():
    batch = torch.rand(3, 40, 48, 3)
    ds = datasets.from_images(batch, ["a photo of [trigger]"], opts(trigger_word="sks"))
    assert [i.caption for i in ds.items] == ["a photo of sks"] * 3 and ds.items[2].name == "images #3"
    assert ds.items[0].content_key() != ds.items[1].content_key()
    with pytest.raises(datasets.DatasetError, match="3 images but 2 captions"):
        datasets.from_images(batch, ["a", "b"], opts())


def test_mflux_examples_block(tmp_path):
    (tmp_path / "images").mkdir()
    photo(tmp_path / "images" / "01.jpg")
    config = {"lora_layers": {"single_transformer_blocks": {"block_range": {"start": 0, "end": 38},
                                                            "layer_types": ["proj_out"], "lora_rank": 4}},
              "examples": {"path": "images/", "images": [{"image": "01.jpg", "prompt": "photo of sks dog"},
                                                         {"image": "02.jpg", "prompt": "photo of sks dog"}]}}
    (tmp_path / "train.json").write_text(json.dumps(config))
    with pytest.raises(datasets.DatasetError, match=r"02.jpg does not exist \(looked in .*images\)"):
        datasets.from_mflux_config(tmp_path / "train.json", opts())
    config["examples"]["images"].pop()
    (tmp_path / "train.json").write_text(json.dumps(config))
    ds, cfg = datasets.from_mflux_config(tmp_path / "train.json", opts())
    assert [i.caption for i in ds.items] == ["photo of sks dog"] and cfg["lora_layers"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(datasets.DatasetError, match="not valid JSON"):
        datasets.from_mflux_config(tmp_path / "bad.json")


def test_empty_and_missing_folders_and_bad_settings(tmp_path):
    with pytest.raises(datasets.DatasetError, match="holds no usable images"):
        datasets.from_folder(tmp_path, opts())
    with pytest.raises(datasets.DatasetError, match="does not exist"):
        datasets.from_folder(tmp_path / "nope", opts())
    with pytest.raises(datasets.DatasetError, match="captions is 'guess'"):
        opts(captions="guess")
    with pytest.raises(ValueError, match="resolution 500 must be a multiple of 16"):
        Shaping(500)


def test_tag_shuffles_keep_the_trigger_first():
    shuffles = captions.shuffled_tags("sks, smiling, outdoors, red scarf, winter", 1, 4, seed=0)
    assert shuffles and all(s.startswith("sks, ") for s in shuffles)
    assert all(sorted(s.split(", ")) == sorted("sks, smiling, outdoors, red scarf, winter".split(", "))
               for s in shuffles)
    assert captions.shuffled_tags("a photo of sks", 1, 4, seed=0) == []


def test_fingerprint_follows_the_files(tmp_path):
    caption(photo(tmp_path / "1.jpg"), "x")
    first = datasets.fingerprint(tmp_path)
    assert datasets.fingerprint(tmp_path) == first
    caption(photo(tmp_path / "2.jpg"), "y")
    assert datasets.fingerprint(tmp_path) != first


def test_bundled_quickstart_set_is_valid():
    ds = datasets.from_folder(QUICKSTART, opts(trigger_word="sks"))
    assert len(ds) == 6 and all(i.caption.startswith("a photo of sks toy") for i in ds.items)


def test_captions_can_use_another_extension_as_ai_toolkit_caption_ext(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.caption").write_text(f"photo {name} of sks")
    (tmp_path / "a.txt").write_text("the txt caption, not used")
    options = datasets.Options("sks", caption_ext="caption", shaping=Shaping(64))
    found = datasets.from_folder(tmp_path, options)
    assert sorted(i.caption for i in found.items) == ["photo a of sks", "photo b of sks"]
    assert any("a.txt left out" in n for n in found.skipped)
    with pytest.raises(datasets.DatasetError, match="b.jpg has no caption in b.txt"):
        (tmp_path / "b.txt").unlink(missing_ok=True)
        datasets.from_folder(tmp_path, datasets.Options("sks", captions="txt", shaping=Shaping(64)))
    with pytest.raises(datasets.DatasetError, match="caption_ext is 'jpg'"):
        datasets.Options(caption_ext="jpg")
