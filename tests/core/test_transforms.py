"""An encoder's image transform (vlv.data.transforms) and the crops the readers take in place of a size."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlv.config import EncoderConfig
from vlv.data.caches import decoded_at, key_crop
from vlv.data.datasets import InMemory, decode
from vlv.data.images import Crop, as_crop, official_crop, square
from vlv.data.transforms import ImageTransform
from vlv.encoder import VLVEncoder
from vlv.errors import InvalidInput


def _coordinates(w: int, h: int) -> Image.Image:
    """Each pixel holds its own (x, y): a crop's offsets can be read off its first pixel."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


@pytest.mark.parametrize("w, h, official_left, vlv_left", [(67, 64, 2, 1), (71, 64, 4, 3), (69, 64, 2, 2),
                                                           (64, 64, 0, 0)])
def test_official_crop_rounds_offsets_half_to_even(w, h, official_left, vlv_left):
    """torchvision's CenterCrop rounds (w - s) / 2 with Python's round (half to even); vlv's square floors it."""
    im = _coordinates(w, h)
    assert official_crop(im, 64)[0, 0, 0] == official_left and square(im, 64)[0, 0, 0] == vlv_left
    assert official_crop(_coordinates(h, w), 64)[0, 0, 1] == official_left  # portrait: the top offset alike


def test_official_crop_resizes_the_shorter_side_first():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (77, 130, 3), dtype=np.uint8))  # w 130, h 77
    resized = im.resize((int(64 * 130 / 77), 64), Image.BILINEAR)  # 108 x 64, as torchvision's Resize(64)
    assert np.array_equal(official_crop(im, 64), np.asarray(resized)[:, 22:86])
    assert official_crop(im, 64).shape == (64, 64, 3) and Crop(64, "official")(im).shape == (64, 64, 3)


def test_crops_are_values_and_sizes_mean_vlvs_square():
    assert as_crop(48) == Crop(48, "vlv") and as_crop(Crop(48, "official")) == Crop(48, "official")
    with pytest.raises(ValueError, match="crop kind"):
        Crop(48, "bogus")
    arr = np.zeros((48, 48, 3), np.uint8)
    assert decode(arr, 48) is arr
    with pytest.raises(ValueError, match="official crop"):  # decoded already by vlv's square: not cut again
        decode(arr, Crop(48, "official"))


def test_in_memory_data_refuses_another_crop(shapes_data):
    data = InMemory.of(shapes_data["val"], 64)
    data.require_size(Crop(64))
    with pytest.raises(ValueError, match="official crop"):
        data.require_size(Crop(64, "official"))


def test_cache_keys_name_a_crop_only_when_it_is_not_vlvs():
    """Keys made before crops had kinds (``resolution`` only) still match a vlv crop."""
    assert decoded_at(64) == decoded_at(Crop(64)) == {"resolution": 64}
    assert decoded_at(Crop(64, "official")) == {"resolution": 64, "crop": "official"}
    assert key_crop({"resolution": 64}) == Crop(64) and key_crop(decoded_at(Crop(9, "official"))) == Crop(9, "official")


def test_config_fields_default_to_todays_behaviour():
    """An encoder.json written before the fields loads as vlv's transform at the encoder's own size."""
    config = EncoderConfig(text_dim=8, image_size=64)
    assert (config.transform, config.crop_size, config.frozen_dtype) == ("vlv", None, None)
    torch.manual_seed(0)
    enc = VLVEncoder(EncoderConfig.named("shapes", text_dim=8, num_queries=4))
    assert enc.transform == ImageTransform("vlv", 64, 64, enc.config.image_mean, enc.config.image_std)
    for bad in ({"transform": "bogus"}, {"crop_size": 0}, {"frozen_dtype": "float64"}):
        with pytest.raises(InvalidInput):
            EncoderConfig(text_dim=8, **bad)


def test_pixels_take_uint8_squares_of_any_side():
    t = ImageTransform("vlv", 48, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert t.pixels(np.zeros((2, 48, 48, 3), np.uint8)).shape == (2, 3, 64, 64)  # torch bicubic to S
    assert t.at(64).crop == Crop(64, "vlv")
    official = ImageTransform("official", 48, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.equal(official.pixels(np.full((1, 48, 48, 3), 255, np.uint8)), torch.ones(1, 3, 64, 64))
    with pytest.raises(ValueError, match="uint8"):
        t.pixels(torch.zeros(2, 3, 48, 48))  # a float tensor in [-1, 1] is no longer an image here
