"""Every problem of a dataset in one report, before anything is encoded: files dropped without a
word before (metadata rows without a photo, photos beside concept folders, hidden folders taken
for concepts), size problems together with the rest, every concept folder at once."""

import json

import pytest
import torch
from PIL import Image

from trainer.data import datasets
from trainer.data.images import Shaping


def photo(path, caption="a photo", size=(96, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (len(path.name) * 20 % 255, 120, 60)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def opts(**kw):
    return datasets.Options(**{"trigger_word": "sks", "shaping": Shaping(64), **kw})


def test_size_and_file_problems_of_every_concept_come_in_one_report(tmp_path):
    photo(tmp_path / "10_sks dog" / "ok.png")
    photo(tmp_path / "10_sks dog" / "tiny.png", size=(20, 20))  # a size problem...
    (tmp_path / "10_sks dog" / "broken.jpg").write_bytes(b"not a jpeg")  # ...with a file problem
    (tmp_path / "10_sks dog" / "broken.txt").write_text("x")
    photo(tmp_path / "5_xyz cat" / "nocaption.png", caption=None)  # the second bad folder is reported too
    photo(tmp_path / "5_xyz cat" / "ok.png")
    photo(tmp_path / "loose.jpg")  # beside the concept folders
    (tmp_path / "3_empty").mkdir()
    photo(tmp_path / ".ipynb_checkpoints" / "x.png", caption=None)  # hidden: not a concept
    with pytest.raises(datasets.DatasetError) as e:
        datasets.from_folder(tmp_path, opts(), concepts=True)
    problems = e.value.problems
    assert len(problems) == 5 and str(e.value).startswith("5 problem(s)")
    assert any(p.startswith("10_sks dog/tiny.png is 20×20") for p in problems)
    assert any(p.startswith("10_sks dog/broken.jpg is not an image") for p in problems)
    assert any(p.startswith("5_xyz cat/nocaption.png has no caption") for p in problems)
    assert any(p.startswith("loose.jpg is beside the concept folders") for p in problems)
    assert "3_empty/ holds no photos." in problems and ".ipynb_checkpoints" not in str(e.value)
    ds = datasets.from_folder(tmp_path, opts(problems="skip"), concepts=True)  # hidden folders never stop a run
    assert [(i.image.parent.name, i.name) for i in ds.items] == [("10_sks dog", "ok.png"), ("5_xyz cat", "ok.png")]
    assert ds.triggers == ("sks", "xyz") and len(ds.skipped) == 5


def test_metadata_rows_without_a_photo_and_captions_without_one_are_named(tmp_path):
    photo(tmp_path / "a.jpg", caption=None)
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"file_name": "a.jpg", "text": "a dog"}, {"file_name": "gone.jpg", "text": "a dog"})))
    (tmp_path / "lost.txt").write_text("the photo of this caption was renamed")
    (tmp_path / "sub").mkdir()
    with pytest.raises(datasets.DatasetError) as e:
        datasets.from_folder(tmp_path, opts())
    assert sorted(e.value.problems) == [
        "lost.txt is a caption without an image (no photo named lost.*): add the photo or remove the caption.",
        "metadata.jsonl names gone.jpg, which is not in the folder: add it or remove the row."]
    ds = datasets.from_folder(tmp_path, opts(problems="skip"))
    assert [i.caption for i in ds.items] == ["sks, a dog"]
    assert any(s.startswith("sub/ is a folder and is not read") for s in ds.skipped)  # named, not an error


def test_an_example_with_nothing_to_condition_on_is_refused_by_name(tmp_path):
    photo(tmp_path / "blank.png", caption="   ")
    photo(tmp_path / "fine.png", caption="a dog")
    with pytest.raises(datasets.DatasetError, match="blank.png has an empty caption and there is no trigger word"):
        datasets.from_folder(tmp_path, opts(trigger_word=""))
    assert [i.caption for i in datasets.from_folder(tmp_path, opts()).items] == ["sks", "sks, a dog"]
    with pytest.raises(datasets.DatasetError, match="images #1 has an empty caption"):
        datasets.from_images(torch.rand(1, 64, 64, 3), [""], opts(trigger_word=""))


def test_the_mflux_examples_block_reports_sizes_with_the_rest(tmp_path):
    photo(tmp_path / "small.jpg", size=(20, 20), caption=None)
    photo(tmp_path / "ok.jpg", caption=None)
    config = {"examples": {"path": ".", "images": [{"image": "small.jpg", "prompt": "sks"},
                                                   {"image": "gone.jpg", "prompt": "sks"},
                                                   {"image": "ok.jpg", "prompt": "sks"}]}}
    (tmp_path / "train.json").write_text(json.dumps(config))
    with pytest.raises(datasets.DatasetError) as e:
        datasets.from_mflux_config(tmp_path / "train.json", opts())
    assert len(e.value.problems) == 2 and "small.jpg is 20×20" in str(e.value) and "gone.jpg does not exist" in str(
        e.value)
