import math

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import images
from trainer.data.augment import Augmentation
from trainer.data.images import Shaping


@pytest.mark.parametrize("resolution", [128, 512, 768, 1024])
def test_buckets_keep_the_area_and_sides_multiple_of_16(resolution):
    buckets = images.buckets(resolution)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.8 * resolution ** 2 <= w * h <= resolution ** 2
        assert 1 / 4 <= w / h <= 4


def test_photos_go_to_the_bucket_of_their_shape():
    assert images.pick_bucket(3024, 4032, 1024) == (896, 1152)  # a phone portrait, 3:4
    assert images.pick_bucket(4032, 3024, 1024) == (1152, 896)
    assert images.pick_bucket(1920, 1080, 512) == (672, 384)  # 16:9 → 1.75
    assert images.pick_bucket(1000, 1000, 512) == (512, 512)
    assert images.pick_bucket(3024, 4032, 1024, bucketing=False) == (1024, 1024)
    w, h = images.pick_bucket(3000, 1000, 512)
    assert abs(math.log(w / h) - math.log(3)) < 0.1


def test_a_photo_smaller_than_its_bucket_trains_at_the_largest_bucket_it_covers():
    shaping = Shaping(1024)
    assert images.pick_bucket(1200, 800, 1024) == (1216, 832)  # refused before: "smaller than its bucket"
    w, h = shaping.bucket(1200, 800, "02.png")
    assert (w, h) == (1200, 768) and w % 16 == h % 16 == 0  # never enlarged, and most of its pixels kept
    w, h = shaping.bucket(800, 600, "small.jpg")
    assert w <= 800 and h <= 600 and w * h >= 0.9 * 800 * 600 and abs(w / h - 4 / 3) < 0.1
    assert Shaping(1024, upscale_small=True).bucket(800, 600, "small.jpg") == (1152, 896)
    assert shaping.bucket(4032, 3024, "big.jpg") == (1152, 896)  # a photo that covers it: the full bucket


def test_only_photos_under_the_minimum_size_are_refused_by_name():
    with pytest.raises(images.ImageProblem) as e:
        Shaping(1024).bucket(500, 400, "thumb.jpg")  # shorter side under half the resolution
    assert "thumb.jpg is 500×400" in str(e.value) and "minimum_image_size" in str(e.value)
    assert Shaping(1024, minimum_image_size=256).bucket(500, 400, "thumb.jpg")[0] <= 500
    with pytest.raises(images.ImageProblem, match="under minimum_image_size 1000"):
        Shaping(1024, minimum_image_size=1000).bucket(1200, 800, "02.png")
    with pytest.raises(ValueError, match="minimum_image_size is -1"):
        Shaping(minimum_image_size=-1)


def test_shaping_covers_then_crops(tmp_path):
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 150, 100))  # left half red
    center = Shaping(128, bucketing=False).apply(img, (128, 128))
    assert center.shape == (3, 128, 128)
    assert center[0, :, :40].mean() > 0.9 and center[2, :, -40:].mean() > 0.9  # both halves, cropped evenly
    crops = {tuple(Shaping(128, bucketing=False, crop="random").apply(img, (128, 128), torch.Generator()
                                                                       .manual_seed(s))[0, 0, ::16].tolist())
             for s in range(6)}
    assert len(crops) > 1  # random crops differ


@pytest.mark.parametrize("mode, make, expected", [
    ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),  # pure red ink
    ("I;16", lambda: Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)), (128, 128, 128)),
    ("RGBA", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # transparent: white
    ("P", lambda: _palette(), (0, 255, 0)),
    ("LA", lambda: Image.new("LA", (8, 8), (10, 255)), (10, 10, 10)),
])
def test_modes_become_correct_rgb(mode, make, expected, tmp_path):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    make().save(path)
    rgb = images.open_rgb(path)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[4, 4].astype(int) - expected).max() <= 1


def _palette():
    p = Image.new("P", (8, 8))
    p.putpalette([0, 255, 0] * 256)
    return p


def test_exif_rotation_is_honoured(tmp_path):
    img = Image.new("RGB", (160, 96), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 80, 96))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held sideways: display rotated 90° clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert images.size(tmp_path / "rot.jpg") == (96, 160)
    pixels = np.asarray(images.open_rgb(tmp_path / "rot.jpg"))
    assert pixels.shape == (160, 96, 3)
    assert pixels[:40, :, 0].mean() > 200 and pixels[-40:, :, 2].mean() > 200  # red on top now


def test_augmentation_is_seeded_and_view_zero_is_untouched():
    x = torch.rand(3, 32, 48)
    aug = Augmentation(flip=True, color_jitter=0.2, views=4)
    assert torch.equal(aug.apply(x, 0, torch.Generator().manual_seed(0)), x)
    a = aug.apply(x, 1, torch.Generator().manual_seed(3))
    b = aug.apply(x, 1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert torch.allclose(Augmentation(flip=True).apply(x, 1, torch.Generator()), x.flip(-1))
    assert Augmentation().view_count(random_crop=False) == 1
    assert Augmentation(views=3).view_count(random_crop=True) == 3
    assert Augmentation(flip=True, views=4).view_count(random_crop=False) == 2
    with pytest.raises(ValueError, match="caption_dropout is 1.5"):
        Augmentation(caption_dropout=1.5)


def test_photos_above_maximum_image_size_are_downsampled_to_the_target_then_cropped():
    img = Image.new("RGB", (1600, 1600), (0, 0, 255))
    img.paste((255, 0, 0), (600, 600, 1000, 1000))  # a red square in the middle quarter
    whole = Shaping(128, bucketing=False).apply(img, (128, 128))
    closer = Shaping(128, bucketing=False, maximum_image_size=1024, target_downsample_size=512).apply(img, (128, 128))
    small = Image.new("RGB", (900, 900), (0, 0, 255))
    untouched = Shaping(128, bucketing=False, maximum_image_size=1024, target_downsample_size=512).apply(small,
                                                                                                          (128, 128))
    red = lambda t: float((t[0] > 0.5).float().mean())  # noqa: E731
    assert red(whole) == pytest.approx(0.0625, abs=0.01)  # the whole frame: the square is 1/16 of it
    assert red(closer) == pytest.approx(1.0, abs=0.02)  # at 512 px the square is 128 px: the crop is all square
    assert red(untouched) == 0.0 and untouched.shape == (3, 128, 128)  # under the maximum: fitted whole
    with pytest.raises(ValueError, match="target_downsample_size"):
        Shaping(512, maximum_image_size=1024, target_downsample_size=1536)
    with pytest.raises(ValueError, match="set maximum_image_size"):
        Shaping(512, target_downsample_size=1024)
