import pytest
import torch
from PIL import Image

from trainer.data import datasets
from trainer.data import encode as encoding
from trainer.data.augment import Augmentation
from trainer.data.images import Shaping
from trainer.loop.batches import EpochSampler, choose


class CountingEncoders:
    """Encoders that make latents from the pixels (so content matters) and count their work."""

    def __init__(self, version="v1"):
        self.version, self.images, self.texts, self.released = version, 0, [], False

    def encode_images(self, pixels):
        self.images += len(pixels)
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 6, 1, 1)[:, :16]

    def encode_text(self, caption):
        self.texts.append(caption)
        return torch.full((4, 8), float(len(caption))), torch.full((8,), float(len(caption)))

    def identity(self):
        return {"images": f"vae-{self.version}", "text": f"te-{self.version}"}

    def release(self):
        self.released = True


def folder(path, n=3, size=(96, 64)):
    path.mkdir()
    for i in range(n):
        Image.new("RGB", size, (40 * i, 100, 200)).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"photo {i}")
    return path


def encode(path, encoders, store, **options):
    dataset = datasets.from_folder(path, datasets.Options(trigger_word="sks", **{"shaping": Shaping(64), **options}))
    return encoding.encode_dataset(dataset, encoders, store)


def test_hits_misses_and_what_invalidates(tmp_path):
    encoding.clear_memory()
    path = folder(tmp_path / "photos")
    enc = CountingEncoders()
    store = encoding.EncodeCache(memory=True)
    examples, skipped = encode(path, enc, store)
    assert (enc.images, len(enc.texts), store.misses, store.hits) == (3, 3, 6, 0) and enc.released
    assert examples[0].latents.shape == (16, 6, 10) and not skipped  # 96×64 → the 80×48 bucket at 64²
    again = encoding.EncodeCache(memory=True)
    encode(path, enc, again)
    assert (enc.images, again.hits, again.misses) == (3, 6, 0)  # nothing recomputed

    (path / "1.txt").write_text("photo one, edited")  # a caption changes: only its text
    Image.new("RGB", (96, 64), (0, 0, 0)).save(path / "2.png")  # an image changes (same name): only its latents
    third = encoding.EncodeCache(memory=True)
    encode(path, enc, third)
    assert enc.images == 4 and enc.texts[-1] == "sks, photo one, edited" and third.misses == 2

    encode(path, CountingEncoders("v2"), fourth := encoding.EncodeCache(memory=True))  # another encoder
    assert fourth.misses == 6
    encode(path, enc, fifth := encoding.EncodeCache(memory=True), shaping=Shaping(128, upscale_small=True))
    assert fifth.misses == 3  # another bucket: latents again, captions reused


def test_disk_cache_survives_a_restart(tmp_path):
    encoding.clear_memory()
    path = folder(tmp_path / "photos")
    enc = CountingEncoders()
    first = encoding.EncodeCache(tmp_path / "cache", memory=False)
    a, _ = encode(path, enc, first)
    restarted = encoding.EncodeCache(tmp_path / "cache", memory=False)
    b, _ = encode(path, CountingEncoders(), restarted)
    assert restarted.hits == 6 and restarted.misses == 0
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a, b))
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_views_caption_variants_and_dropout(tmp_path):
    (tmp_path / "p").mkdir()
    Image.fromarray((torch.linspace(0, 255, 96).repeat(96, 1)[..., None].repeat(1, 1, 3)).byte().numpy()).save(
        tmp_path / "p" / "a.png")  # a left-to-right gradient: a flip shows
    (tmp_path / "p" / "a.txt").write_text("sks, smiling, outdoors, red scarf")
    aug = Augmentation(flip=True, views=3, caption_dropout=0.25, shuffle_tags=True)
    (e,), _ = encode(tmp_path / "p", CountingEncoders(), encoding.EncodeCache(memory=False), augment=aug)
    assert len(e.views) == 1 and e.texts and e.dropout_rate == 0.25  # a flip alone: one other view
    assert e.dropout_text[0][0, 0] == len("sks")  # the trigger word is what dropout keeps
    generator = torch.Generator().manual_seed(0)
    picks = [choose(e, generator) for _ in range(400)]
    dropped = sum(p[1][0, 0] == len("sks") for p in picks)
    assert 60 < dropped < 140  # about a quarter
    assert len({p[0][..., 0].sum().item() for p in picks}) == 2  # both views are used


def test_small_photos_train_smaller_and_too_small_ones_stop_before_encoding(tmp_path):
    path = folder(tmp_path / "photos")
    Image.new("RGB", (40, 40)).save(path / "small.png")  # under its 64×64 bucket, over the minimum (32)
    (path / "small.txt").write_text("x")
    Image.new("RGB", (20, 20)).save(path / "tiny.png")
    (path / "tiny.txt").write_text("x")
    encoders = CountingEncoders()
    with pytest.raises(datasets.DatasetError, match="tiny.png is 20×20: its shorter side is under half the resolution"):
        encode(path, encoders, None)
    assert encoders.images == 0  # reported when the dataset is read, before anything is encoded
    examples, skipped = encode(path, encoders, None, problems="skip")
    assert len(examples) == 4 and len(skipped) == 1 and "tiny.png" in skipped[0]
    assert sorted(tuple(e.latents.shape[-2:]) for e in examples)[0] == (4, 4)  # small.png at 32×32, not enlarged


def test_batches_never_mix_buckets():
    sampler = EpochSampler([1, 2, 1, 1], 2, torch.Generator().manual_seed(0),
                           [(16, 8, 8), (16, 8, 12), (16, 8, 8), (16, 8, 12)])
    seen = []
    for _ in range(6):
        batch = sampler.next_batch()
        assert len({(16, 8, 8) if i in (0, 2) else (16, 8, 12) for i in batch}) == 1
        seen += batch
    assert sorted(seen[:5]) == [0, 1, 1, 2, 3]  # the first epoch has every image, with its repeats
