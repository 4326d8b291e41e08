from dataclasses import replace

from PIL import Image

from trainer.data import datasets, report
from trainer.data.images import Shaping


def test_report_counts_buckets_and_warns(tmp_path):
    sizes = {"portrait.jpg": (600, 800), "landscape.jpg": (800, 600), "square.jpg": (700, 700), "small.jpg": (300, 300)}
    for name, size in sizes.items():
        Image.new("RGB", size, (len(name) * 9, 90, 30)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a photo of sks dog")
    Image.new("RGB", (700, 700), (len("square.jpg") * 9, 90, 30)).save(tmp_path / "copy.jpg")  # same as square.jpg
    (tmp_path / "copy.txt").write_text("a dog without the word, " + "very " * 80 + "long")
    ds = datasets.from_folder(tmp_path, datasets.Options(trigger_word="sks", shaping=Shaping(512)))
    text, warnings = report.report(ds)
    assert "5 images: 5 of subjects" in text
    assert "at 512: 512×512 ×2, " in text and "288×288 ×1" in text and "448×576 ×1" in text and "576×448 ×1" in text
    assert any("duplicate images: copy.jpg, square.jpg" in w for w in warnings)
    assert any("small.jpg is 300×300, smaller than its 512×512 bucket: it trains at 288×288" in w for w in warnings)
    assert any(w.startswith("copy.jpg: caption has about") for w in warnings)
    reg = datasets.from_folder(tmp_path, datasets.Options(default_caption="x", shaping=Shaping(512)))
    reg = datasets.Dataset(tuple(i for i in reg.items if i.name == "copy.jpg"), source="reg")
    both = ds + reg.with_items(regularisation=True)  # copy.txt says "a dog without the word, …": fine
    assert not any("regularisation caption" in w for w in report.report(both)[1])
    named = datasets.Dataset((replace(reg.items[0], written="photo of sks dog", regularisation=True),), source="r")
    assert any("copy.jpg: this regularisation caption names the subject's trigger 'sks'" in w
               for w in report.report(ds + named)[1])
