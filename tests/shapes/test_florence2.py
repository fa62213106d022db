"""The pretrained shapes Florence-2: detection targets in Florence-2's location-token format, its training run,
and the native dir it writes, which the VLV encoder reads as it reads Florence-2-large."""

import json

import pytest
import torch
from transformers import AutoTokenizer, Florence2ForConditionalGeneration

from vlv.config import EncoderConfig
from vlv.encoder import VLVEncoder
from vlv.shapes import world
from vlv.shapes.config import DetectionSettings
from vlv.shapes.florence2 import (
    RECORD_FILE,
    build_detection_tokenizer,
    detection_text,
    parse_detections,
    quantize,
    train_florence2,
)
from vlv.training.loop import TrainConfig


def test_detection_text_reads_back_every_scene():
    tok = build_detection_tokenizer()
    for i in range(300):
        scene = world.scene_at(0, "train", i)
        text = detection_text(scene)
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert parse_detections(tok.decode(ids)) == scene.facts  # through the tokenizer, as generate's output is


def test_detection_text_is_florence2_format():
    o = world.ShapeObject("circle", "red", "large", "top left", dx=-3, dy=2)
    scene = world.make_scene([o])
    # box [cx - r, cy - r, cx + r, cy + r] = [2, 7, 24, 29], one location bin per pixel
    assert detection_text(scene) == "red circle<loc_2><loc_7><loc_24><loc_29>"
    assert quantize(-1) == 0 and quantize(64) == 63


def test_parse_ignores_what_is_not_an_object():
    assert parse_detections("") == set()
    assert parse_detections("red circle<loc_2><loc_7>") == set()  # a box needs four corners
    assert parse_detections("pink circle<loc_2><loc_7><loc_24><loc_29>") == set()


def test_a_training_run_writes_a_native_florence2_dir(tmp_path, shapes_data):
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=0, progress=False)
    settings = DetectionSettings(data=str(shapes_data["train"]), val=str(shapes_data["val"]), eval_n=4)
    model = train_florence2(settings, cfg, tmp_path / "f2")
    record = json.loads((tmp_path / "f2" / RECORD_FILE).read_text())
    # 3 steps detect nothing yet (scene accuracy 0, no floor fits): the held-out eval read eval_n = 4 val scenes.
    assert record["train"]["steps"] == 3 and record["val"]["n"] == 4 and "scene_accuracy" in record["val"]

    loaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "f2")
    tok = AutoTokenizer.from_pretrained(tmp_path / "f2")
    assert len(tok) == loaded.config.text_config.vocab_size
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.model.get_image_features(x).pooler_output
        # The VLV encoder reads the dir as a pretrained Florence-2: the same image features.
        enc = VLVEncoder(EncoderConfig(text_dim=32, florence2=str(tmp_path / "f2"), image_size=64,
                                       prompt_ids=[0, 2]))
        assert torch.equal(enc.image_features(x), ref)
        assert enc.vision_frozen and enc(x).shape == (2, 77, 32)


def test_a_folder_without_scenes_is_refused(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="scene"):
        train_florence2(DetectionSettings(data=str(tmp_path)), TrainConfig(steps=1, progress=False), tmp_path / "o")
    assert not (tmp_path / "o").exists()
