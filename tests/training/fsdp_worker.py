"""Run under torchrun by test_sharding: stage 2 on 2 processes with DDP, FSDP2 and ZeRO-2-style sharding, an
FSDP2 run stopped halfway and resumed from its sharded checkpoint, and stage 1 (no layout of its own: the default
one) with DDP and zero2. Each rank records its share of the trainable weights and the final saves it made."""

import json
import os
import sys
from pathlib import Path

import torch

import vlv.training.stage1
import vlv.training.stage2
from vlv.captioner import Captioner
from vlv.encoder import VLVEncoder
from vlv.training import loop
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.stage1 import train_stage1
from vlv.training.stage2 import train_stage2

data, teacher, stage1, lm, out = map(Path, sys.argv[1:6])
rank = int(os.environ["RANK"])
settings = Stage2Settings(decoder=str(teacher), encoder=str(stage1), lm=str(lm), data=str(data), num_workers=0,
                          trainable="mlp+llm")
base = {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False}
shares: dict[str, float] = {}


def measuring(task, cfg, run, accelerator=None):
    state = loop.train(task, cfg, run, accelerator)
    params = [p for p in task.trainable().parameters() if p.requires_grad]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    shares[f"{task.name}-{cfg.sharding}"] = local / sum(p.numel() for p in params)
    return state


vlv.training.stage2.train = vlv.training.stage1.train = measuring
saves = {"captioner": 0, "encoder": 0}  # final weights written by this rank


def counting(cls, kind):
    save = cls.save_pretrained

    def counted(self, *args, **kwargs):
        saves[kind] += 1
        return save(self, *args, **kwargs)
    cls.save_pretrained = counted


counting(Captioner, "captioner")
counting(VLVEncoder, "encoder")
for name in ("ddp", "fsdp2", "zero2"):
    assert train_stage2(settings, TrainConfig(**base, sharding=name), out / name, progress=False) is not None
stopped = train_stage2(settings, TrainConfig(**base, sharding="fsdp2", stop_after=2), out / "resumed", progress=False)
assert stopped is None and (out / "resumed" / "checkpoint" / "shards" / ".metadata").exists()
train_stage2(settings, TrainConfig(**base, sharding="fsdp2"), out / "resumed", progress=False)
s1 = Stage1Settings(decoder=str(teacher), data=str(data), encoder="shapes", num_queries=8, num_workers=0)
for name in ("ddp", "zero2"):
    assert train_stage1(s1, TrainConfig(**base, sharding=name), out / f"s1-{name}", progress=False) is not None
(out / f"shares.rank{rank}.json").write_text(json.dumps(shares))
(out / f"saves.rank{rank}.json").write_text(json.dumps(saves))
torch.distributed.barrier()
print(f"rank {rank} done", flush=True)
