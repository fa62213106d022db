"""Run under torchrun by test_tracking's distributed test: a toy run reporting to an in-memory tracker on every
rank; each rank writes what its tracker received."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from vlv.training.config import TrainConfig
from vlv.training.loop import train
from vlv.training.tracking import Texts


class Recorder(GeneralTracker):
    name, requires_logging_directory = "recorder", False

    def __init__(self):
        super().__init__()
        self.logs, self.started = [], False

    @property
    def tracker(self):
        return self

    def start(self):
        self.started = True

    def log(self, values, step=None, **kwargs):
        self.logs.append([step, values])


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


class Toy:
    """y = sum(x); each batch takes 0.5 s of the rank's fake clock; rank r counts 4 + r items per step."""

    name = "toy"

    def __init__(self, clock):
        torch.manual_seed(0)
        self.model, self.clock = torch.nn.Linear(4, 1), clock

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        self.clock.now += 0.5
        x = torch.randn(batch_size, 4, generator=torch.Generator().manual_seed(step * world_size + rank))
        return x, x.sum(1, keepdim=True), rank

    def loss(self, model, batch, draws):
        x, y, rank = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x) + rank

    def evaluate(self, model):
        return {"val_loss": 1.0, "captions": Texts((f"rank {os.environ['RANK']}",))}


run, out = Path(sys.argv[1]), Path(sys.argv[2])
clock, recorder = Clock(), Recorder()
train(Toy(clock), TrainConfig(steps=4, batch_size=4, log_every=2, eval_every=4, progress=False), run,
      Accelerator(cpu=True, log_with=[recorder]), clock=clock)
rank = int(os.environ["RANK"])
(out / f"rank{rank}.json").write_text(json.dumps({"started": recorder.started, "logs": recorder.logs},
                                                 default=lambda v: np.asarray(v).tolist()))
