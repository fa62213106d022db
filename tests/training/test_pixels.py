"""The shapes world's pixels under the encoder's own transform: training gets the very bits the code before it
computed (the shapes encoders' numbers must not move), and the shipped weights' inference reads what training read.

"Before" is ``VLVEncoder.normalize`` and the readers' integer sizes as they were (b06bc31), copied here verbatim.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlv.captioner import Captioner
from vlv.config import CaptionerConfig, EncoderConfig
from vlv.data.datasets import ImageFiles, InMemory, open_dataset
from vlv.data.images import Crop, to_tensor
from vlv.data.loader import row_loader
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.shipped import installed, resolve_decoder
from vlv.text_encoder import load_text_encoder
from vlv.training.data import StepImages
from vlv.training.stage1 import Stage1Task
from vlv.training.stage2 import Stage2Task

CPU = torch.device("cpu")


def old_normalize(images: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """``VLVEncoder.normalize`` before the transform: images in [-1, 1] -> pixel_values."""
    size = config.image_size
    x = (images + 1) / 2  # (B, 3, H, W) in [0, 1]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = x.new_tensor(config.image_mean)[:, None, None]
    std = x.new_tensor(config.image_std)[:, None, None]
    return (x - mean) / std  # (B, 3, S, S)


def _encoder(name: str, text_dim: int) -> VLVEncoder:
    if name == "shapes-stage1":
        return VLVEncoder.from_pretrained(name)  # its encoder.json predates the transform fields
    torch.manual_seed(0)
    return VLVEncoder(EncoderConfig.named(name, text_dim, num_queries=8))


ENCODERS = ["shapes", "shapes-pretrained", "shapes-stage1"]


@pytest.fixture(scope="module")
def decoder(tiny_teacher):
    return DiffusionDecoder.from_pretrained(tiny_teacher)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("source", ["memory", "folder", "folder-48px"])
def test_stage1_training_pixels_are_the_old_bits(name, source, decoder, shapes_data):
    """The demo's path (data in memory), the lazy one (a folder decoded by the reader) and a data resolution other
    than the encoder's (torch bicubic 48 -> 64 px), for each shapes encoder: equal, bit for bit."""
    encoder = _encoder(name, decoder.text_dim)
    assert encoder.transform.kind == "vlv"
    size = 48 if source == "folder-48px" else 64
    data = InMemory.of(shapes_data["train"], 64) if source == "memory" else open_dataset(shapes_data["train"])
    task = Stage1Task(encoder, decoder, data, seed=3, image_size=size)
    before = StepImages(data, size, seed=3)  # the old reader: an integer size
    for step in (0, 1):
        new, old = task.batch(step, 0, 8, CPU), before.get(step, 0, 1, 8)
        assert new["pixel_values"].shape == (8, 3, 64, 64)
        assert torch.equal(new["pixel_values"], old_normalize(to_tensor(old["images"].numpy()), encoder.config))
        assert torch.equal(new["images"], to_tensor(old["images"].numpy()))  # the VAE's input too


@pytest.mark.parametrize("name", ENCODERS)
def test_stage2_training_pixels_are_the_old_bits(name, tiny_teacher, shapes_data):
    text_encoder = load_text_encoder(resolve_decoder("shapes-teacher") if name == "shapes-stage1" else tiny_teacher)
    encoder = _encoder(name, text_encoder.config.hidden_size)
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, trainable="mlp",
                             lm=dict(model_type="qwen2", vocab_size=336, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    captioner = Captioner(config, text_encoder, encoder, tokenizer=build_shapes_tokenizer())
    data = open_dataset(shapes_data["train"])
    task = Stage2Task(captioner, data, seed=5)
    before = StepImages(data, encoder.config.image_size, seed=5)  # stage 2 read at the encoder's size
    for step in (0, 1):
        new, old = task.batch(step, 0, 4, CPU), before.get(step, 0, 1, 4)
        assert torch.equal(new["pixel_values"], old_normalize(to_tensor(old["images"].numpy()), encoder.config))


@pytest.mark.skipif(not installed("shapes-stage1"), reason="shipped weights not installed")
def test_shipped_encoders_inference_pixels_are_the_old_bits(shapes_data, tmp_path):
    """What ``vlv caption / embed / reconstruct`` feed the shipped encoder (the reader crops, then pixels) is what
    they fed it before (the reader at the encoder's size, to [-1, 1], normalize): the shapes PNGs and photos of
    other sizes alike."""
    encoder = VLVEncoder.from_pretrained("shapes-stage1")
    assert encoder.config.crop_size is None and encoder.transform.crop == Crop(64, "vlv")  # an old encoder.json
    rng = np.random.default_rng(0)
    paths = sorted(p for p in shapes_data["val"].iterdir() if p.suffix == ".png")[:4]
    for i, (w, h) in enumerate([(100, 80), (63, 97), (64, 64), (31, 33)]):
        paths.append(tmp_path / f"odd{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    new_batch = next(iter(row_loader(ImageFiles(paths), encoder.transform.crop, 0, len(paths), len(paths))))
    old_batch = next(iter(row_loader(ImageFiles(paths), encoder.config.image_size, 0, len(paths), len(paths))))
    new = encoder.transform.pixels(new_batch["images"])
    assert torch.equal(new, old_normalize(to_tensor(old_batch["images"].numpy()), encoder.config))
    assert torch.equal(encoder.preprocess(paths), new)  # the API's way: files or PIL through the same transform
