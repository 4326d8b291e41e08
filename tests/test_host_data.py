"""Host tests for datasets: a phone's worth of awkward photos, buckets, the cache, captioning,
class images, images from other nodes (in-process ComfyUI)."""

import numpy as np
import pytest
from comfyui_host import requires_host, train_prompt
from PIL import Image
from tiny_vlms import blip

pytestmark = requires_host


def messy_folder(root):
    """Every case a phone dump has: formats, rotation, transparency, palette, CMYK, 16-bit,
    portrait and landscape, and bad files (no caption, unreadable, truncated, too small)."""
    folder = root / "input" / "messy"
    folder.mkdir(parents=True)
    gradient = np.linspace(0, 255, 160, dtype=np.uint8)[None, :, None].repeat(120, 0).repeat(3, 2)
    good = {
        "portrait.jpg": lambda p: Image.fromarray(gradient).rotate(90, expand=True).save(p, quality=92),
        "landscape.webp": lambda p: Image.fromarray(gradient).save(p),
        "rotated.jpg": lambda p: Image.fromarray(gradient).save(p, exif=_exif(6)),
        "alpha.png": lambda p: Image.new("RGBA", (140, 140), (255, 0, 0, 120)).save(p),
        "palette.png": lambda p: Image.fromarray(gradient).convert("P").save(p),
        "cmyk.jpg": lambda p: Image.fromarray(gradient).convert("CMYK").save(p),
        "sixteen.png": lambda p: Image.fromarray((gradient[..., 0].astype(np.uint16) * 257)).save(p),
    }
    for name, save in good.items():
        save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a photo of the toy, {name.split('.')[0]}")
    Image.fromarray(gradient).save(folder / "no_caption.jpg")
    (folder / "unreadable.jpg").write_bytes(b"not a jpeg")
    (folder / "unreadable.txt").write_text("x")
    Image.fromarray(gradient).save(folder / "whole.jpg", quality=95)
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:300])
    (folder / "whole.jpg").unlink()
    (folder / "truncated.txt").write_text("x")
    Image.new("RGB", (20, 20)).save(folder / "too_small.png")  # under minimum_image_size (half of 64)
    (folder / "too_small.txt").write_text("x")
    return folder


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def dataset_prompt(folder, **dataset):
    prompt = train_prompt(steps=3)
    prompt["2"]["inputs"].update(folder=str(folder), **dataset)
    prompt["30"] = {"class_type": "FluxDreamBoothDatasetReport", "inputs": {"dataset": ["2", 0]}}
    return prompt


def test_a_messy_folder_trains_on_what_is_usable_and_names_the_rest(host):
    folder = messy_folder(host.root)
    with pytest.raises(RuntimeError) as e:  # problems='stop': every bad file in one error, sizes too,
        host.run(dataset_prompt(folder, resolution="64, 128"))  # of every resolution
    for name in ("no_caption.jpg", "unreadable.jpg", "truncated.jpg", "too_small.png"):
        assert name in str(e.value)
    assert str(e.value).count("unreadable.jpg") == 1 and "resolution 128" in str(e.value)
    outputs = host.run(dataset_prompt(folder, problems="skip"))
    report = outputs["30"]["text"][0]
    assert report.startswith("7 images")  # the seven good ones; too_small.png is left out by name
    for name in ("no_caption.jpg", "unreadable.jpg", "truncated.jpg", "too_small.png"):
        assert name in report and name in outputs["4"]["text"][0]  # in the report and the Train summary
    assert "; 7 images," in outputs["4"]["text"][0]  # trained on the seven
    assert "at 64: " in report and "48×80" in report and "80×48" in report  # portrait and landscape buckets
    assert outputs["4"]["text"][0].startswith("3 steps")


def test_the_cache_skips_encoding_on_the_next_run_and_encoders_leave(host, tmp_path):
    import comfy.model_management

    prompt = train_prompt(steps=2, cache="disk")
    prompt["2"]["inputs"]["resolution"] = "80"  # a resolution and a trigger word no other test uses:
    prompt["2"]["inputs"]["trigger_word"] = "cachetest"  # nothing cached yet, in memory or on disk
    first = host.run(prompt)["4"]["text"][0]
    assert "0 encodings from the cache" in first
    loaded = {type(m.model.model).__name__ for m in comfy.model_management.current_loaded_models if m.model}
    assert "AutoencoderKL" not in loaded and "FluxClipModel" not in loaded  # they left after encoding
    prompt["4"]["inputs"]["seed"] = 1  # the Train node runs again; its encodings are the same
    assert ", 0 computed" in host.run(prompt)["4"]["text"][0]
    assert list((host.root / "output" / "flux_dreambooth" / "cache").rglob("*.safetensors"))
    prompt["2"]["inputs"]["trigger_word"] = "zzz"  # now prepended: the captions change, and only they are encoded
    assert ", 6 computed" in host.run(prompt)["4"]["text"][0]


def test_several_resolutions_and_images_from_other_nodes(host):
    prompt = train_prompt(steps=2)
    prompt["2"]["inputs"]["resolution"] = "64, 96"
    prompt["10"] = {"class_type": "EmptyImage", "inputs": {"width": 120, "height": 80, "batch_size": 2,
                                                           "color": 0x3366CC}}
    prompt["11"] = {"class_type": "FluxDreamBoothDatasetImages", "inputs": {
        "previous": ["2", 0], "images": ["10", 0], "captions": "a photo of [trigger] on blue", "trigger_word": "xyz",
        "class_word": "", "repeats": 2, "resolution": "64", "bucketing": True, "crop": "center",
        "upscale_small": False, "problems": "stop"}}
    prompt["4"]["inputs"]["dataset"] = ["11", 0]
    prompt["30"] = {"class_type": "FluxDreamBoothDatasetReport", "inputs": {"dataset": ["11", 0]}}
    outputs = host.run(prompt)
    report = outputs["30"]["text"][0]
    assert report.startswith("14 images") and "at 96: " in report and "xyz ×2" in report
    assert "images #2: a photo of xyz on blue" in report


def test_caption_node_writes_sidecars_and_takes_edits(host, monkeypatch):
    import folder_paths

    models = host.root / "models"
    blip(models / "vlm" / "tiny-blip")
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    folder = host.root / "input" / "to_caption"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 80), (80 * i, 100, 60)).save(folder / f"{i}.png")
    caption = {"class_type": "FluxDreamBoothCaption", "inputs": {
        "folder": "to_caption", "model": "vlm/tiny-blip", "style": "short", "trigger_word": "sks",
        "class_word": "toy", "overwrite": False, "max_new_tokens": 12, "edited_captions": ""}}
    text = host.run({"1": caption})["1"]["captions"][0]
    assert text.startswith("0.png: sks toy, ") and (folder / "1.txt").read_text().startswith("sks toy, ")
    caption["inputs"]["edited_captions"] = text.replace(text.splitlines()[0], "0.png: sks toy on a red rug")
    again = host.run({"1": caption})["1"]["captions"][0]
    assert again.splitlines()[0] == "0.png: sks toy on a red rug" == "0.png: " + (folder / "0.txt").read_text().strip()


def test_class_images_are_rendered_once_and_train_as_regularisation(host):
    prompt = train_prompt(steps=2)
    prompt["12"] = {"class_type": "FluxDreamBoothClassImages", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompt": "a photo of a toy", "count": 3,
        "width": 64, "height": 64, "seed": 0, "steps": 4, "guidance": 3.5, "sampler_name": "euler",
        "scheduler": "simple", "loss_weight": 0.5}}
    prompt["2"]["inputs"]["previous"] = ["12", 0]
    prompt["30"] = {"class_type": "FluxDreamBoothDatasetReport", "inputs": {"dataset": ["2", 0]}}
    outputs = host.run(prompt)
    assert "9 images: 6 of subjects, 3 regularisation (loss weight 0.5)" in outputs["30"]["text"][0]
    folder = next((host.root / "output" / "flux_dreambooth" / "class_images").glob("a_photo_of_a_toy_*"))
    made = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert len(made) == 3 and (folder / "0000.txt").read_text() == "a photo of a toy"
    prompt["4"]["inputs"]["seed"] = 5
    host.run(prompt)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == made  # reused, not rendered again


def test_a_regularisation_folder_trains_on_its_captions_without_the_trigger(host):
    folder = host.root / "input" / "reg_people"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 80), (60 * i, 90, 120)).save(folder / f"{i}.png")
    base = train_prompt()["2"]["inputs"]
    prompt = {  # built as the folder node's tooltip says: default trigger 'sks', default_caption 'person'
        "1": {"class_type": "FluxDreamBoothDatasetFolder",
              "inputs": {**base, "folder": str(folder), "class_word": "", "default_caption": "person",
                         "minimum_image_size": 48}},
        "2": {"class_type": "FluxDreamBoothRegularisation", "inputs": {"dataset": ["1", 0], "loss_weight": 1.0}},
        "3": {"class_type": "FluxDreamBoothDatasetFolder", "inputs": {**base, "previous": ["2", 0],
                                                                      "trigger_word": "ohwx"}},
        "30": {"class_type": "FluxDreamBoothDatasetReport", "inputs": {"dataset": ["3", 0]}},
    }
    report = host.run(prompt)["30"]["text"][0]
    lines = report.splitlines()
    assert "  0.png: person" in lines and "  1.png: person" in lines  # not "sks, person"
    assert "subjects: ohwx toy ×6 (validation prompts: [trigger] = ohwx)" in report
