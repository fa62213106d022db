"""Sharded stage 2 (FSDP2) on 2 CPU processes (gloo): the production path of vlv.training.sharding."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlv.captioner import TRAINABLE_FILE, Captioner
from vlv.encoder import TRAINABLE_FILE as ENCODER_FILE
from vlv.modeling import trainable_state
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.training.config import LMSettings, Stage1Settings, TrainConfig
from vlv.training.lm import train_lm
from vlv.training.stage1 import train_stage1

pytestmark = pytest.mark.dist  # torchrun, 2 processes


def test_fsdp2_stage2_equals_ddp_resumes_exactly_and_loads_on_one_process(tiny_teacher, shapes_data, tmp_path):
    """Each rank holds half the trainable weights; the final weights are written by rank 0 alone; the
    consolidated run dir equals a DDP run's to float tolerance
    (stage 2 with its own layout, stage 1 with the default one),
    a run resumed from its sharded checkpoint equals an uninterrupted one bit for bit, and the run dir loads
    strictly on one process."""
    cfg = TrainConfig(steps=1, batch_size=4, progress=False)
    train_lm(LMSettings(data=str(shapes_data["train"])), cfg, tmp_path / "lm", tokenizer=build_shapes_tokenizer())
    train_stage1(Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                                num_queries=8, num_workers=0), cfg, tmp_path / "s1", progress=False)
    worker = Path(__file__).with_name("fsdp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(shapes_data["train"]), str(tiny_teacher), str(tmp_path / "s1"),
                        str(tmp_path / "lm"), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/4" in r.stdout  # the second "resumed" run started from the sharded checkpoint
    for rank in (0, 1):
        shares = json.loads((tmp_path / f"shares.rank{rank}.json").read_text())
        assert shares["stage2-ddp"] == shares["stage1-ddp"] == 1.0, shares
        assert all(0.45 < shares[k] < 0.55 for k in ("stage2-fsdp2", "stage2-zero2", "stage1-zero2")), shares
    # The final weights are written once, by rank 0 (sharded ones gathered onto it): 4 stage-2, 2 stage-1 runs.
    assert [json.loads((tmp_path / f"saves.rank{rank}.json").read_text()) for rank in (0, 1)] == [
        {"captioner": 4, "encoder": 2}, {"captioner": 0, "encoder": 0}]
    ddp, fsdp2, zero2, resumed = (load_file(tmp_path / run / TRAINABLE_FILE)
                                  for run in ("ddp", "fsdp2", "zero2", "resumed"))
    assert ddp.keys() == fsdp2.keys() == zero2.keys() == resumed.keys() and any(k.startswith("lm.") for k in ddp)
    s1_ddp, s1_zero2 = (load_file(tmp_path / run / ENCODER_FILE) for run in ("s1-ddp", "s1-zero2"))
    assert s1_ddp.keys() == s1_zero2.keys()
    for a, b in ((fsdp2, ddp), (zero2, ddp), (s1_zero2, s1_ddp)):
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in b])
        assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() < 1e-3
    assert all(torch.equal(resumed[k], fsdp2[k]) for k in fsdp2)
    captioner = Captioner.from_pretrained(tmp_path / "fsdp2")
    assert all(torch.equal(v, fsdp2[k]) for k, v in trainable_state(captioner).items())
