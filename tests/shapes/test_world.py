import hashlib

import numpy as np
import pytest
from PIL import ImageFilter

from vlv.shapes import world as shapes
from vlv.shapes.world import ShapeObject, make_scene

SPEC_EXAMPLE = ("a large red circle at the top left, a small cyan square at the top right and a small yellow "
                "triangle at the bottom right")
GOLDEN = [  # (scene, sha256 of the raw RGB pixels)
    ([("circle", "red", "large", "top left", 0, 0), ("square", "cyan", "small", "top right", 2, -3),
      ("triangle", "yellow", "small", "bottom right", -1, 1)],
     "a864232f5ace3dd38f6715fbcfa41be0c060694603859b788634a159268e72ed"),
    ([("circle", "cyan", "small", "top left", 0, -3), ("circle", "purple", "large", "top right", 2, -2),
      ("circle", "blue", "small", "bottom right", -1, -3)],
     "a650feafb58b68754af12b3aa7ff325b053055fd3864c3d0f9a6197fc215a872"),
    ([("square", "blue", "large", "bottom left", 1, 0)],
     "07476d939db47ca494832a02bafae89e7588297726f502e5c1e4a771c7e8a1cc"),
]


def scene(objs):
    return make_scene([ShapeObject(*o) for o in objs])


@pytest.mark.parametrize("objs,digest", GOLDEN)
def test_golden_pixels(objs, digest):
    assert hashlib.sha256(shapes.render(scene(objs)).tobytes()).hexdigest() == digest


def test_pixels_follow_the_spec():
    img = np.asarray(shapes.render(scene(GOLDEN[0][0])))
    assert img.shape == (64, 64, 3) and tuple(img[0, 0]) == (128, 128, 128)
    # square r=6 at (50, 13): inclusive box [44, 56] x [7, 19], no anti-aliasing
    assert tuple(img[7, 44]) == tuple(img[19, 56]) == (60, 200, 210)
    assert tuple(img[6, 44]) == tuple(img[7, 43]) == tuple(img[20, 56]) == (128, 128, 128)
    # triangle r=6 at (47, 49): apex (47, 43) coloured, the base row 55 spans [41, 53]
    assert tuple(img[43, 47]) == tuple(img[55, 41]) == tuple(img[55, 53]) == (235, 205, 50)
    assert tuple(img[43, 44]) == (128, 128, 128)
    # circle r=11 at (16, 16)
    assert tuple(img[16, 16]) == tuple(img[16, 5]) == (220, 50, 50) and tuple(img[5, 5]) == (128, 128, 128)
    assert set(map(tuple, img.reshape(-1, 3))) == {(128, 128, 128), (220, 50, 50), (60, 200, 210), (235, 205, 50)}


def test_caption_grammar_round_trips():
    assert shapes.caption(scene(GOLDEN[0][0])) == SPEC_EXAMPLE
    assert shapes.caption(scene(GOLDEN[2][0])) == "a large blue square at the bottom left"
    two = scene(GOLDEN[0][0][:2])
    assert shapes.caption(two) == "a large red circle at the top left and a small cyan square at the top right"
    for i in range(300):
        s = shapes.scene_at(1, "train", i)
        text = shapes.caption(s)
        assert shapes.is_well_formed(text) and shapes.parse_caption(text) == s.facts
        assert shapes.Scene.from_json(s.to_json()) == s
    assert not shapes.is_well_formed(SPEC_EXAMPLE + ".")
    assert shapes.parse_caption("a huge red circle at the top left") == set()


def test_generator_is_pinned():
    # scene_at is a pure function of (seed, split, index): changing the sampler changes every dataset.
    assert shapes.scene_at(0, "train", 0).to_json()["objects"][1] == {
        "shape": "circle", "color": "purple", "size": "large", "position": "top right", "dx": 2, "dy": -2}


def test_scene_rules():
    with pytest.raises(ValueError):
        scene([("circle", "red", "large", "top left", 0, 0), ("square", "red", "large", "top left", 0, 0)])
    with pytest.raises(ValueError):
        scene([("circle", "red", "large", "top left", 4, 0)])
    counts = [len(shapes.scene_at(2, "train", i).objects) for i in range(600)]
    assert set(counts) == {1, 2, 3} and all(120 < counts.count(k) < 280 for k in (1, 2, 3))


def _test_scenes(n=2000):
    return [shapes.scene_at(7, "test", i) for i in range(n)]


def test_readers_are_exact_on_clean_renders():
    scenes = _test_scenes()
    truths = [s.facts for s in scenes]
    assert shapes.score([shapes.parse_caption(shapes.caption(s)) for s in scenes], truths).scene_accuracy == 1.0
    assert shapes.score([shapes.detect(shapes.render(s)) for s in scenes], truths).scene_accuracy == 1.0


def test_detector_survives_blur_and_colour_jitter():
    rng = np.random.default_rng(0)
    scenes = _test_scenes(1000)
    preds = []
    for s in scenes:
        img = np.asarray(shapes.render(s).filter(ImageFilter.GaussianBlur(1)), dtype=np.int32)
        img = img + rng.integers(-15, 16, size=3)  # a per-image colour drift of up to 15 per channel
        preds.append(shapes.detect(np.clip(img, 0, 255).astype(np.uint8)))
    assert shapes.score(preds, [s.facts for s in scenes]).scene_accuracy >= 0.95


def test_score_by_hand():
    t = {("top left", "circle", "red", "large"), ("top right", "square", "blue", "small")}
    p = {("top left", "circle", "red", "small"), ("top right", "square", "blue", "small")}
    s = shapes.score([p, t], [t, t])
    assert s.scene_accuracy == 0.5
    assert s.object_precision == s.object_recall == s.object_f1 == 0.75
    assert s.attribute_accuracy == pytest.approx(11 / 12)
    empty = shapes.score([set()], [t])
    assert empty.object_f1 == 0.0 and empty.attribute_accuracy == 0.0
