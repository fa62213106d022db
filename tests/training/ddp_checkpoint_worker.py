"""Run under torchrun by test_train's DDP checkpoint test: a toy DDP run with an EMA, uninterrupted and stopped
halfway then resumed from its distributed checkpoint; a run stopped halfway is left for one process to resume;
write_once; and the process group's timeout. Each rank saves its final weights."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlv.training.config import TrainConfig
from vlv.training.loop import train, write_once


class Toy:
    """Fit y = x @ w with two layers; a batch is a pure function of (step, rank, world size)."""

    name = "toy"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        x = torch.randn(batch_size, 4, generator=torch.Generator().manual_seed(step * world_size + rank))
        return x, x.sum(1, keepdim=True)

    def loss(self, model, batch, draws):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    def evaluate(self, model):
        return {}


def run(name: str, out: Path, rank: int, **kw) -> Toy:
    task = Toy()
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, ema_decay=0.9, log_every=1, progress=False, **kw)
    train(task, cfg, out / name)
    save_file({k: v.contiguous() for k, v in task.model.state_dict().items()}, out / f"{name}.rank{rank}.safetensors")
    return task


if __name__ == "__main__":
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    run("full", out, rank)
    # The process group the run made waits as long as the config says (gloo's own default: 30 minutes).
    backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    (out / f"timeout.rank{rank}").write_text(str(backend.options._timeout))
    run("resumed", out, rank, stop_after=3)
    run("resumed", out, rank)
    half = run("half", out, rank, stop_after=3)
    write_once(half.model, lambda: (out / f"written.rank{rank}").write_text("once"))
    print(f"rank {rank} done", flush=True)
