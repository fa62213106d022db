"""Run under torchrun by test_train's distributed test: a toy budgeted run that rank 1 alone may be signalled in."""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlv.training.config import TrainConfig
from vlv.training.loop import train


class Toy:
    """Fit y = sum(x); the ranks keep different clocks (rank 1 sleeps longer), as real ranks do."""

    name = "toy"

    def __init__(self, signal_at: int):
        self.model, self.signal_at = torch.nn.Linear(4, 1), signal_at

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        if rank == 1 and step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.002 * (1 + 2 * rank))
        x = torch.randn(batch_size, 4, generator=torch.Generator().manual_seed(step * world_size + rank))
        return x, x.sum(1, keepdim=True)

    def loss(self, model, batch, draws):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    def evaluate(self, model):
        return {}


run, out, signal_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
task = Toy(signal_at)
cfg = TrainConfig(steps=None, budget_minutes=0.04, checkpoint_minutes=1e-4, batch_size=4, lr=1e-2, warmup_steps=5,
                  progress=False)
state = train(task, cfg, run)
rank = int(os.environ["RANK"])
save_file({k: v.contiguous() for k, v in task.model.state_dict().items()}, out / f"rank{rank}.safetensors")
print(f"rank {rank}: step {state.step} planned {state.planned_steps} done {state.done}", flush=True)
