"""Run under torchrun by test_train's every-task test: each trainable task for a few steps, per-rank weights saved.

Every stage's own entry point runs (teacher, LM, stage 1, stage 2); the loop's ``train`` is wrapped where each
stage module imported it, so after each run every rank writes what its trainable module holds. The global batch
is fixed: each of N processes takes 1/N of it. With a third argument (an earlier run's out dir), every task after
the VAE reads that run's inputs (teacher's latent file, teacher, LM, stage 1), so only its own training can differ.
"""

import os
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

import vlv.shapes.teacher
import vlv.training.lm
import vlv.training.stage1
import vlv.training.stage2
from vlv.modeling import trainable_state
from vlv.shapes.config import TINY, teacher_recipe
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.training import loop
from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig

data, out = Path(sys.argv[1]), Path(sys.argv[2])
inputs = Path(sys.argv[3]) if len(sys.argv) > 3 else out
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
per = 4 // world  # 4 (teacher 8) samples per step in all


def dumping(task, cfg, run, accelerator=None):
    state = loop.train(task, cfg, run, accelerator)
    save_file({k: v.contiguous() for k, v in trainable_state(task.trainable()).items()},
              out / f"{task.name}.rank{rank}.safetensors")
    return state


for module in (vlv.shapes.teacher, vlv.training.lm, vlv.training.stage1, vlv.training.stage2):
    module.train = dumping
own_latents = vlv.shapes.teacher.posteriors_file


def inputs_latents(vae, data, path, batch_size=128):
    """The run's own keyed file is made (its VAE differs from the other run's), then the other run's is used."""
    own_latents(vae, data, path, batch_size)
    return load_file(inputs / "teacher" / "training" / "latents.safetensors")


if inputs != out:
    vlv.shapes.teacher.posteriors_file = inputs_latents

recipe = teacher_recipe(vae={"steps": 3, "batch_size": 2 * per},
                        unet={"steps": 3, "batch_size": 2 * per, "warmup_steps": 0, "eval_every": 0})
vlv.shapes.teacher.train_teacher(data, out / "teacher", TINY, recipe, progress=False)
teacher = inputs / "teacher"
cfg = TrainConfig(steps=3, batch_size=per, lr=1e-3, warmup_steps=0, progress=False)
vlv.training.lm.train_lm(LMSettings(data=str(data)), cfg, out / "lm", tokenizer=build_shapes_tokenizer())
s1 = Stage1Settings(decoder=str(teacher), data=str(data), encoder="shapes", num_queries=8, num_workers=0)
vlv.training.stage1.train_stage1(s1, cfg, out / "stage1", progress=False)
s2 = Stage2Settings(decoder=str(teacher), encoder=str(inputs / "stage1"), lm=str(inputs / "lm"), data=str(data),
                    num_workers=0)
vlv.training.stage2.train_stage2(s2, cfg, out / "stage2", progress=False)
print(f"rank {rank} done", flush=True)
