from PIL import Image

from trainer.data import datasets, report
from trainer.data.images import Shaping


def test_report_counts_buckets_and_warns(tmp_path):
    sizes = {"portrait.jpg": (600, 800), "landscape.jpg": (800, 600), "square.jpg": (700, 700), "tiny.jpg": (200, 200)}
    for name, size in sizes.items():
        Image.new("RGB", size, (len(name) * 9, 90, 30)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a photo of sks dog")
    Image.new("RGB", (700, 700), (len("square.jpg") * 9, 90, 30)).save(tmp_path / "copy.jpg")  # same as square.jpg
    (tmp_path / "copy.txt").write_text("a dog without the word, " + "very " * 80 + "long")
    ds = datasets.from_folder(tmp_path, datasets.Options(trigger_word="sks", shaping=Shaping(512)))
    text, warnings = report.report(ds)
    assert "5 images: 5 of subjects" in text
    assert "at 512: 512×512 ×3, " in text and "448×576 ×1" in text and "576×448 ×1" in text
    assert any("duplicate images: copy.jpg, square.jpg" in w for w in warnings)
    assert any("tiny.jpg is 200×200, smaller than its 512×512 bucket" in w for w in warnings)
    assert any(w.startswith("copy.jpg: caption has about") for w in warnings)
    assert not any("lacks the trigger word" in w for w in warnings)  # the dataset prepended it
    bare = datasets.Dataset(tuple(i for i in ds.items if i.name == "portrait.jpg"), "sks", "x")
    bare = bare.with_items(caption="a dog")
    assert any("portrait.jpg: caption lacks the trigger word 'sks'" in w for w in report.report(bare)[1])
