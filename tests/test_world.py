"""The synthetic world the tiny FLUX pretrains on: every scene is drawn as captioned, and the
pixel reader that later judges samples reads each drawn scene back."""

import random

import numpy as np

from trainer.pretrain.world import COLOURS, PLACES, SHAPES, Scene, describe, draw, random_scene


def test_every_drawn_scene_reads_back_as_its_caption():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(200)]
    wrong = [s for s in scenes if not describe(draw(s, 64, jitter=0.15, rng=rng)).matches(s)]
    assert not wrong, f"{len(wrong)} of 200 misread, e.g. {wrong[:3]}"


def test_the_reader_tells_each_shape_colour_and_place_apart():
    for shape in SHAPES:
        for colour in COLOURS:
            for place in PLACES:
                background = "black" if colour != "black" else "white"
                reading = describe(draw(Scene(colour, shape, place, background), 48))
                assert (reading.shape, reading.colour, reading.place, reading.background) == \
                    (shape, colour, place, background)


def test_a_noisy_or_empty_image_is_not_read_as_a_scene():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert describe(noise).shape is None
    assert describe(np.full((64, 64, 3), 128, np.uint8)).shape is None


def test_captions_name_colour_shape_background_and_place():
    assert Scene("red", "circle", "top left", "blue").caption == "a red circle on a blue background, top left"
