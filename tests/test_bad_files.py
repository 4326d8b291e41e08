"""Fault test: a folder of bad files. Each is named, hidden ones are ignored, large photos decode
within a memory bound (peak measured), and the rest trains on the tiny FLUX."""

import logging
import math
import os
import struct
import zlib
from dataclasses import replace

import pytest
import torch
from PIL import Image, features

from trainer.data import datasets, images
from trainer.data.encode import encode_dataset
from trainer.data.images import Shaping
from trainer.loop.trainer import TrainConfig, train
from trainer.lora.targets import LayerSpec
from trainer.lora.weights import LoraSet

log = logging.getLogger(__name__)
MB = 1024 * 1024


def flat_png(path, width, height, mode="RGB"):
    """A PNG of one colour written row by row: a 14000×14000 one is under 1 MB and costs no memory."""
    channels, colour = {"L": (1, 0), "RGB": (3, 2)}[mode]

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    comp, row = zlib.compressobj(1), bytes(1 + width * channels)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def photo(path, caption="a photo", size=(96, 80), **save):
    Image.new("RGB", size, (len(path.name) * 20 % 255, 120, 60)).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_bytes(fn):
    """Extra resident memory at the peak of `fn()` (Linux: the high-water mark reset first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("peak memory is measured through /proc/self/clear_refs (Linux)")
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def bad_folder(root):
    folder = root / "photos"
    folder.mkdir()
    good = [photo(folder / "good1.png"), photo(folder / "GOOD2.JPG", quality=90), photo(folder / "good3.jfif"),
            photo(folder / "good4.gif")]
    if features.check("avif"):
        good.append(photo(folder / "good5.avif"))
    (folder / "UPPER.TXT").write_text("a caption with an uppercase extension")
    photo(folder / "upper.JPEG", caption=None)
    good.append(folder / "upper.JPEG")
    flat_png(folder / "big.png", 8000, 8000).with_suffix(".txt").write_text("an 8000×8000 photo")
    good.append(folder / "big.png")
    bad = {
        "truncated.jpg": "cannot be decoded", "empty.png": "is empty (0 bytes)", "latin.txt": "is not UTF-8",
        "orphan.txt": "is a caption without an image", "loop.jpg": "is a link that leads nowhere",
        "pipe.jpg": "is not a regular file", "huge.png": "is 14000×14000 (196 MP), more than the 100 MP",
        "wide.png": "is 20000×20: its shorter side is under", "nocaption.webp": "has no caption",
    }
    whole = photo(folder / "whole.jpg", size=(256, 256), quality=95)
    (folder / "truncated.jpg").write_bytes(whole.read_bytes()[:500])
    whole.unlink(), whole.with_suffix(".txt").rename(folder / "truncated.txt")
    (folder / "empty.png").write_bytes(b""), (folder / "empty.txt").write_text("x")
    photo(folder / "latin.png", caption=None)
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "orphan.txt").write_text("a caption whose photo is gone")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")  # reading it would wait forever
    flat_png(folder / "huge.png", 14000, 14000, "L").with_suffix(".txt").write_text("x")  # PIL: DecompressionBombError
    flat_png(folder / "wide.png", 20000, 20).with_suffix(".txt").write_text("x")
    photo(folder / "nocaption.webp", caption=None)
    if not images.HEIF:
        photo(folder / "iphone.jpg", caption="x").rename(folder / "iphone.heic")
        bad["iphone.heic"] = "install pillow-heif"
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "good1-checkpoint.png").write_bytes(b"junk")
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    (folder / "notes.md").write_text("shot on a phone")
    return folder, good, bad


def test_a_folder_of_bad_files_names_each_and_trains_the_rest(tmp_path, tiny_flux):
    folder, good, bad = bad_folder(tmp_path)
    options = datasets.Options(trigger_word="sks", shaping=Shaping(64))
    with pytest.raises(datasets.DatasetError) as e:
        datasets.from_folder(folder, options)
    message = str(e.value)
    for name, why in bad.items():
        assert any(name in p and why in p for p in e.value.problems), (name, why, message)
    assert len(e.value.problems) == len(bad)  # and nothing else: the good and hidden files are not problems
    assert ".ipynb_checkpoints" not in message and ".DS_Store" not in message

    skipped = datasets.from_folder(folder, replace(options, problems="skip"))
    assert sorted(i.name for i in skipped.items) == sorted(p.name for p in good)
    assert {i.name: i.caption for i in skipped.items}["upper.JPEG"] == "sks, a caption with an uppercase extension"
    assert any(s.startswith("notes.md left out") for s in skipped.skipped)  # named, not an error
    assert len(skipped.skipped) == len(bad) + 1

    examples, left_out = encode_dataset(skipped, tiny_flux)  # the rest trains
    assert len(examples) == len(good) and left_out == list(skipped.skipped)
    backend = tiny_flux.backend()
    lora = LoraSet(LayerSpec.preset("attention", backend.dims, rank=2).targets(backend.dims), seed=0)
    result = train(backend, lora, examples, TrainConfig(steps=2, learning_rate=1e-3, seed=0))
    assert result.steps_done == 2 and all(math.isfinite(x) for x in result.losses)
    assert any(w.up.abs().sum() > 0 for w in lora)


def test_paths_that_are_not_folders_are_named(tmp_path):
    photo(tmp_path / "a.png")
    with pytest.raises(datasets.DatasetError, match=r"a.png is a file, not a folder: give the folder that holds it"):
        datasets.from_folder(tmp_path / "a.png")
    with pytest.raises(datasets.DatasetError, match="nope does not exist"):
        datasets.from_folder(tmp_path / "nope")
    with pytest.raises(datasets.DatasetError, match=r"folder is empty \(''\)"):
        datasets.from_folder("")  # not the current directory
    with pytest.raises(datasets.DatasetError, match="is a folder: give the path of its JSON file"):
        datasets.from_mflux_config(tmp_path)


def test_large_photos_decode_within_a_memory_bound(tmp_path):
    png = flat_png(tmp_path / "big.png", 8000, 8000)
    Image.new("L", (8000, 8000), 128).save(tmp_path / "big.jpg", quality=80)
    jpg = tmp_path / "big.jpg"
    full = 8000 * 8000 * 4  # how PIL holds an RGB image in memory
    png_check = peak_bytes(lambda: images.inspect(png))
    png_open = peak_bytes(lambda: images.open_rgb(png, (512, 512)))
    jpg_check = peak_bytes(lambda: images.inspect(jpg))
    jpg_open = peak_bytes(lambda: images.open_rgb(jpg, (512, 512)))
    log.warning("peak memory decoding 8000×8000: PNG check %.0f MB, PNG to its 512 bucket %.0f MB, JPEG check "
                "%.1f MB, JPEG to its 512 bucket %.1f MB", png_check / MB, png_open / MB, jpg_check / MB,
                jpg_open / MB)
    assert png_check < 1.15 * full and png_open < 1.15 * full  # one decoded copy, no conversions of it
    assert jpg_check < 16 * MB and jpg_open < 32 * MB  # decoded at 1/8 scale (draft), not 64 MP
    assert images.open_rgb(jpg, (512, 512)).size[0] >= 512 and images.open_rgb(png, (512, 512)).size[0] >= 1024


def test_pillows_pixel_limit_is_handled_deliberately(tmp_path, monkeypatch):
    jpg = tmp_path / "phone.jpg"
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(jpg)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # as if it were a 200 MP phone photo
    with pytest.raises(Image.DecompressionBombError):
        Image.open(jpg)  # what PIL alone does: no file name
    assert images.inspect(jpg) == ((3000, 2000), None) and images.open_rgb(jpg, (384, 256)).size == (750, 500)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000  # put back
    flat_png(tmp_path / "huge.png", 14000, 14000, "L")
    assert "huge.png" in str(pytest.raises(images.ImageProblem, images.open_rgb, tmp_path / "huge.png").value)


def test_trained_pixels_match_an_unbounded_decode(tmp_path):
    gradient = torch.linspace(0, 1, 1600)[None, :, None].repeat(1200, 1, 3)
    images.from_tensor(gradient).save(tmp_path / "g.png")
    shaping = Shaping(128)
    bucket = shaping.bucket(1600, 1200, "g.png")
    bounded = shaping.apply(images.open_rgb(tmp_path / "g.png", bucket), bucket)
    plain = shaping.apply(images.open_rgb(tmp_path / "g.png"), bucket)
    assert (bounded - plain).abs().max() < 0.02  # reduced before resizing, the same pixels to within 2 %
