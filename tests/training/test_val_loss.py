"""Stage 1's held-out loss on any image data: draws fixed per image, so it moves only when the weights do."""

import json

import numpy as np
import torch
from PIL import Image

from vlv.data.datasets import InMemory
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import load_pipeline
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.stage1 import build_encoder, held_out_loss, train_stage1, val_loss_evaluator


def _photos(folder, n=5):
    """A folder of random images, no captions and no scenes: data the shapes evaluators cannot read."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_the_held_out_loss_is_fixed_per_image_and_moves_with_the_weights(tiny_teacher, shapes_data, tmp_path):
    decoder = DiffusionDecoder(load_pipeline(tiny_teacher)).eval()
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8)
    encoder = build_encoder(settings, decoder.text_encoder.config.hidden_size, seed=0).eval()
    data = InMemory.of(_photos(tmp_path / "val"), decoder.image_size)
    loss = held_out_loss(encoder, decoder, data)
    assert held_out_loss(encoder, decoder, data) == loss  # the same draws at every evaluation
    assert abs(held_out_loss(encoder, decoder, data, batch_size=2) - loss) < 1e-6  # per image, not per batch
    assert held_out_loss(encoder, decoder, data, seed=1) != loss
    torch.manual_seed(0)
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    assert held_out_loss(encoder, decoder, data) != loss


def test_a_stage1_run_records_the_held_out_loss_of_non_shapes_data(tiny_teacher, shapes_data, tmp_path):
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8, num_workers=0)
    evaluator = val_loss_evaluator(_photos(tmp_path / "val"), n=4)
    train_stage1(settings, TrainConfig(steps=2, batch_size=4, eval_every=1, progress=False), tmp_path / "run",
                 progress=False, evaluator=evaluator)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    losses = [row["eval"]["val_loss"] for row in meta["history"] if "eval" in row]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] != losses[1]


def test_train_stage1_val_takes_any_image_data_and_shapes_folders_add_their_accuracy(tiny_teacher, shapes_data,
                                                                                       tmp_path):
    from vlv.cli import main

    photos = _photos(tmp_path / "val")
    for val, run in ((photos, "photos"), (shapes_data["val"], "shapes")):
        assert main(["train", "stage1", "--decoder", str(tiny_teacher), "--data", str(shapes_data["train"]),
                     "--encoder", "shapes", "--nq", "8", "--val", str(val), "--eval-n", "4", "--eval-every", "1",
                     "--steps", "1", "--batch-size", "4", "--num-workers", "0", "--no-cache-vision",
                     "--out", str(tmp_path / run)]) == 0
    metrics = {run: [row["eval"] for row in json.loads((tmp_path / run / "checkpoint" / "trainer.json").read_text())
                     ["history"] if "eval" in row][0] for run in ("photos", "shapes")}
    assert set(metrics["photos"]) == {"val_loss", "step", "elapsed_s"}
    assert {"val_loss", "recon_scene_accuracy"} <= set(metrics["shapes"])
