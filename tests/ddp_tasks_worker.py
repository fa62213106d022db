"""Run under torchrun by test_train's every-task test: each trainable task for a few steps, per-rank weights saved.

Every stage's own entry point runs (teacher, LM, stage 1, stage 2); the loop's ``train`` is wrapped where each
stage module imported it, so after each run every rank writes what its trainable module holds.
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import vlv.shapes.teacher
import vlv.training.lm
import vlv.training.stage1
import vlv.training.stage2
from vlv.modeling import trainable_state
from vlv.shapes.config import TINY, TeacherRecipe
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.training import loop
from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig

data, out = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ.get("RANK", 0))


def dumping(task, cfg, run, accelerator=None):
    state = loop.train(task, cfg, run, accelerator)
    save_file({k: v.contiguous() for k, v in trainable_state(task.trainable()).items()},
              out / f"{task.name}.rank{rank}.safetensors")
    return state


for module in (vlv.shapes.teacher, vlv.training.lm, vlv.training.stage1, vlv.training.stage2):
    module.train = dumping

recipe = TeacherRecipe(vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, unet_warmup=0, eval_every=0)
teacher = vlv.shapes.teacher.train_teacher(data, out / "teacher", TINY, recipe, progress=False)
cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=0, progress=False)
vlv.training.lm.train_lm(LMSettings(data=str(data)), cfg, out / "lm", tokenizer=build_shapes_tokenizer())
s1 = Stage1Settings(decoder=str(teacher), data=str(data), encoder="shapes", num_queries=8, num_workers=0)
vlv.training.stage1.train_stage1(s1, cfg, out / "stage1", progress=False)
s2 = Stage2Settings(decoder=str(teacher), encoder=str(out / "stage1"), lm=str(out / "lm"), data=str(data),
                    num_workers=0)
vlv.training.stage2.train_stage2(s2, cfg, out / "stage2", progress=False)
print(f"rank {rank} done", flush=True)
