"""The Python API (``vlv.api.VLV``) and shipped names: a stage-2 run that names its parts by shipped name
loads from anywhere, and the API captions / reconstructs exactly as the library functions do."""

import json

import numpy as np
import pytest
from PIL import Image

from vlv import shipped as presets
from vlv.api import VLV
from vlv.captioner import Captioner
from vlv.data.images import load_image
from vlv.data.records import read_records
from vlv.decoder import DiffusionDecoder
from vlv.inference import caption_images, reconstruct_images
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.lm import train_lm
from vlv.training.stage1 import build_encoder
from vlv.training.stage2 import train_stage2


@pytest.fixture(scope="module")
def shipped(tiny_teacher, shapes_data, tmp_path_factory):
    """Tiny stage-1, LM and stage-2 dirs registered under the shipped names, as an install would hold them."""
    root = tmp_path_factory.mktemp("weights")
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8)
    build_encoder(settings, decoder.text_dim, seed=0).save_pretrained(root / "shapes-stage1")
    assert train_lm(LMSettings(data=str(shapes_data["train"])),
                    TrainConfig(steps=2, batch_size=4, progress=False), root / "shapes-lm",
                    tokenizer=build_shapes_tokenizer()) is not None
    names = {"shapes-teacher": (tiny_teacher, "model_index.json"),
             "shapes-stage1": (root / "shapes-stage1", "encoder.json"),
             "shapes-lm": (root / "shapes-lm", "config.json"),
             "shapes-stage2": (root / "shapes-stage2", "captioner.json")}
    with pytest.MonkeyPatch.context() as mp:
        for name, entry in names.items():
            mp.setitem(presets.SHIPPED, name, entry)
        s2 = Stage2Settings(decoder="shapes-teacher", encoder="shapes-stage1", lm="shapes-lm",
                            data=str(shapes_data["train"]), trainable="mlp+llm", max_new_tokens=12, num_beams=1)
        assert train_stage2(s2, TrainConfig(steps=2, batch_size=3, progress=False), root / "shapes-stage2",
                            progress=False) is not None
        yield root


def test_a_run_made_from_shipped_names_keeps_the_names(shipped):
    settings = json.loads((shipped / "shapes-stage2" / "stage2.json").read_text())["settings"]
    assert (settings["decoder"], settings["encoder"], settings["lm"]) == ("shapes-teacher", "shapes-stage1",
                                                                          "shapes-lm")
    assert Captioner.from_pretrained("shapes-stage2").config.lm == "shapes-lm"


def test_api_captions_like_the_library_and_takes_files_or_pil(shipped, shapes_data):
    folder = shapes_data["val"]
    paths = [folder / r.image for r in read_records(folder)][:3]
    vlv = VLV.from_pretrained()
    expected = caption_images(Captioner.from_pretrained("shapes-stage2").eval(),
                              np.stack([load_image(p, 64) for p in paths]))
    assert vlv.caption(paths) == expected
    assert vlv.caption([Image.open(p) for p in paths]) == expected


def test_api_reconstructs_like_the_library(shipped, shapes_data):
    folder = shapes_data["val"]
    paths = [folder / r.image for r in read_records(folder)][:2]
    vlv = VLV.from_pretrained(captioner=None)
    images = vlv.reconstruct(paths, steps=2)
    x = np.stack([load_image(p, vlv.encoder.config.image_size) for p in paths])
    expected = reconstruct_images(vlv.encoder, vlv.decoder, x, steps=2)
    assert [im.size for im in images] == [(vlv.decoder.image_size,) * 2] * 2
    assert np.array_equal(np.stack([np.asarray(im) for im in images]),
                          np.asarray(expected.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1)))
    assert vlv.embed(paths).shape == (2, 8, vlv.decoder.text_dim)
    with pytest.raises(ValueError, match="no captioner"):
        vlv.caption(paths)


def test_unknown_dirs_fail_with_one_clear_error(tmp_path):
    for fn in (presets.resolve_decoder, presets.resolve_encoder, presets.resolve_stage2):
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            fn(tmp_path)


def test_api_loads_in_a_dtype_and_the_decoder_follows(shipped, shapes_data):
    import torch

    from vlv.errors import InvalidInput

    paths = [shapes_data["val"] / r.image for r in read_records(shapes_data["val"])][:2]
    with pytest.raises(InvalidInput, match="precision 'fp8'"):
        VLV.from_pretrained(device="cpu", dtype="fp8")
    vlv = VLV.from_pretrained(device="cpu", dtype="bf16")
    for model in (vlv.encoder, vlv.captioner, vlv.decoder):  # the decoder loads lazily, in the encoder's dtype
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, type(model)
    assert vlv.embed(paths).dtype == torch.float32
    assert len(vlv.caption(paths)) == 2
