"""Run by test_stage1.test_two_processes_agree under torchrun: a tiny stage-1 run, weights saved per rank."""

import sys
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file

from vlv.data.datasets import InMemory
from vlv.decoder import DiffusionDecoder
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.loop import train
from vlv.training.stage1 import Stage1Task, build_encoder

teacher, data, out = map(Path, sys.argv[1:4])
accelerator = Accelerator(cpu=True)
decoder = DiffusionDecoder.from_pretrained(teacher)
settings = Stage1Settings(decoder=str(teacher), data=str(data), encoder="shapes", num_queries=8)
encoder = build_encoder(settings, decoder.text_dim, seed=0)
task = Stage1Task(encoder, decoder, InMemory.of(data, 64), seed=0)
train(task, TrainConfig(steps=3, batch_size=2, lr=1e-3, progress=False), out / "run", accelerator=accelerator)
state = {n: p.detach().contiguous() for n, p in encoder.named_parameters()}
save_file(state, out / f"rank{accelerator.process_index}.safetensors")
print(f"rank {accelerator.process_index} of {accelerator.num_processes} done")
