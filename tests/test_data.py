import json

import pytest
import torch
from PIL import Image

from trainer import data

QUICKSTART = data.Path(__file__).resolve().parents[1] / "trainer" / "assets" / "quickstart"


def photo(path, size=(96, 80), color=(200, 40, 40), mode="RGB", **save):
    Image.new(mode, size, color).save(path, **save)
    return path


def caption(path, text):
    path.with_suffix(".txt").write_text(text)


def test_folder_with_captions_and_trigger(tmp_path):
    caption(photo(tmp_path / "a.jpg"), "photo of [trigger] dog")
    caption(photo(tmp_path / "b.png"), "a dog in the park")
    caption(photo(tmp_path / "c.webp"), "sks dog, sitting")
    ds = data.from_folder(tmp_path, trigger_word="sks", repeats=3)
    assert [i.caption for i in ds.items] == ["photo of sks dog", "sks, a dog in the park", "sks dog, sitting"]
    assert [i.repeats for i in ds.items] == [3, 3, 3] and len(ds) == 3


def test_trigger_word_must_appear_as_a_word():
    assert data.with_trigger("a dog that asks for treats", "sks") == "sks, a dog that asks for treats"
    assert data.with_trigger("photo of sks, dog", "sks") == "photo of sks, dog"


def test_caption_encodings(tmp_path):
    photo(tmp_path / "bom.jpg")
    (tmp_path / "bom.txt").write_bytes("\ufeffsks dog".encode("utf-8"))
    photo(tmp_path / "latin.jpg")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 sks".encode("latin-1"))
    with pytest.raises(data.DatasetError, match="latin.txt is not UTF-8"):
        data.from_folder(tmp_path)
    (tmp_path / "latin.txt").write_text("café sks", encoding="utf-8")
    assert [i.caption for i in data.from_folder(tmp_path, "sks").items] == ["sks dog", "café sks"]


def test_datasets_chain_with_their_own_triggers_and_repeats(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    caption(photo(tmp_path / "a" / "1.jpg"), "a dog")
    caption(photo(tmp_path / "b" / "1.jpg"), "a cat")
    both = data.from_folder(tmp_path / "a", "sks", 1) + data.from_folder(tmp_path / "b", "xyz", 4)
    assert [(i.caption, i.repeats) for i in both.items] == [("sks, a dog", 1), ("xyz, a cat", 4)]
    assert both.trigger_word == "sks, xyz"


def test_fingerprint_follows_the_files(tmp_path):
    caption(photo(tmp_path / "1.jpg"), "x")
    first = data.fingerprint(tmp_path)
    assert data.fingerprint(tmp_path) == first
    caption(photo(tmp_path / "2.jpg"), "y")
    assert data.fingerprint(tmp_path) != first


def test_every_bad_file_is_named_at_once(tmp_path):
    caption(photo(tmp_path / "good.jpg"), "sks")
    photo(tmp_path / "nocaption.png")
    (tmp_path / "notanimage.jpg").write_bytes(b"hello")
    caption(tmp_path / "notanimage.jpg", "x")
    full = (tmp_path / "full.jpg")
    photo(full, size=(256, 256), quality=95)
    (tmp_path / "truncated.jpg").write_bytes(full.read_bytes()[:400])
    caption(tmp_path / "truncated.jpg", "x")
    full.unlink()
    with pytest.raises(data.DatasetError) as e:
        data.from_folder(tmp_path)
    message = str(e.value)
    assert "3 problem(s)" in message
    assert "nocaption.png has no caption file nocaption.txt" in message
    assert "notanimage.jpg is not an image" in message
    assert "truncated.jpg cannot be decoded" in message and "good.jpg" not in message


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(data.DatasetError, match="holds no images"):
        data.from_folder(tmp_path)
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.from_folder(tmp_path / "nope")


def test_images_smaller_than_the_resolution_are_named(tmp_path):
    caption(photo(tmp_path / "big.jpg", size=(600, 520)), "x")
    caption(photo(tmp_path / "small.jpg", size=(500, 300)), "x")
    ds = data.from_folder(tmp_path)
    with pytest.raises(data.DatasetError, match=r"small.jpg \(500×300\)\. Lower resolution to 288"):
        data.check_resolution(ds, 512)
    with pytest.raises(data.DatasetError, match="multiple of 16"):
        data.check_resolution(ds, 500)
    with pytest.raises(data.DatasetError, match=r"lower resolution to 288"):
        data.load_image(tmp_path / "small.jpg", 512)


def test_load_image_crops_resizes_and_follows_exif(tmp_path):
    img = Image.new("RGB", (160, 96), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 80, 96))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held sideways: display rotated 90° clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    pixels = data.load_image(tmp_path / "rot.jpg", 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    # after the rotation the red half is on top
    assert pixels[0, :20].mean() > 0.8 and pixels[2, -20:].mean() > 0.8


def test_transparent_and_palette_images_become_rgb(tmp_path):
    photo(tmp_path / "rgba.png", size=(64, 64), color=(255, 0, 0, 0), mode="RGBA")
    pal = Image.new("P", (64, 64))
    pal.putpalette([0, 255, 0] * 256)
    pal.save(tmp_path / "pal.png")
    assert torch.allclose(data.load_image(tmp_path / "rgba.png", 32), torch.ones(3, 32, 32))  # on white
    assert data.load_image(tmp_path / "pal.png", 32)[1].mean() == 1.0


def test_mflux_examples_block(tmp_path):
    (tmp_path / "images").mkdir()
    photo(tmp_path / "images" / "01.jpg")
    config = {"lora_layers": {"single_transformer_blocks": {"block_range": {"start": 0, "end": 38},
                                                            "layer_types": ["proj_out"], "lora_rank": 4}},
              "examples": {"path": "images/", "images": [{"image": "01.jpg", "prompt": "photo of sks dog"},
                                                         {"image": "02.jpg", "prompt": "photo of sks dog"}]}}
    (tmp_path / "train.json").write_text(json.dumps(config))
    with pytest.raises(data.DatasetError, match=r"02.jpg does not exist \(looked in .*images\)"):
        data.from_mflux_config(tmp_path / "train.json")
    config["examples"]["images"].pop()
    (tmp_path / "train.json").write_text(json.dumps(config))
    ds, cfg = data.from_mflux_config(tmp_path / "train.json")
    assert [i.caption for i in ds.items] == ["photo of sks dog"] and cfg["lora_layers"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(data.DatasetError, match="not valid JSON"):
        data.from_mflux_config(tmp_path / "bad.json")


def test_bundled_quickstart_set_is_valid():
    ds = data.from_folder(QUICKSTART, trigger_word="sks")
    assert len(ds) == 6 and all(i.caption.startswith("a photo of sks toy") for i in ds.items)
    data.check_resolution(ds, 128)


def test_trigger_word_rules():
    assert data.with_trigger("a dog", "") == "a dog"
    assert data.with_trigger("[trigger] on a beach", "") == "on a beach"
    assert data.with_trigger("", "sks") == "sks"
