"""A run's checkpoint, written atomically so that a kill leaves the old one or the new one, whole.

run/checkpoint holds the trainable weights (safetensors, by name), the optimizer state (``torch.save`` of its
state dict, read back with ``weights_only=True``), the EMA weights by parameter name, and trainer.json (step,
elapsed time, history, the plan of a budgeted run). Runs on several processes (sharded, or DDP) write a torch
distributed checkpoint instead, every rank its share (:mod:`vlv.training.sharding`), so no rank waits minutes
for another to write it all; trainer.json's ``layout`` says which. Either layout resumes on any number of
processes; checkpoints of an older vlv (optimizer.safetensors, or no layout) still resume.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from vlv.checks import read_json
from vlv.errors import InvalidInput
from vlv.modeling import load_trainable_state, trainable_state
from vlv.training import sharding
from vlv.training.config import TrainConfig

CHECKPOINT = "checkpoint"
MODEL, OPTIMIZER, EMA, TRAINER = "model.safetensors", "optimizer.pt", "ema.safetensors", "trainer.json"
LEGACY_OPTIMIZER = "optimizer.safetensors"  # an older vlv's flattened AdamW moments
SAFETENSORS, DCP = "safetensors", "dcp"  # trainer.json's layout: one process's files, or a distributed checkpoint


@dataclass
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # loss and eval rows, for curves
    planned_steps: int | None = None  # the step count a budgeted run fixed for itself
    done: bool = False  # reached its last step (not stopped by a signal or a time limit)


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / CHECKPOINT / TRAINER).exists()


def save_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMAModel | None,
                    state: TrainState, cfg: TrainConfig, task_name: str) -> Path:
    """Write run/checkpoint atomically: build checkpoint.tmp, then swap it in with renames."""
    tmp = _fresh(run / (CHECKPOINT + ".tmp"))
    save_file(trainable_state(model), tmp / MODEL)
    torch.save(opt.state_dict(), tmp / OPTIMIZER)
    if ema is not None:
        save_file(dict(zip(_trainable_names(model), (p.contiguous() for p in ema.shadow_params), strict=True)),
                  tmp / EMA)
    _write_meta(tmp, state, cfg, task_name, layout=SAFETENSORS,
                ema_step=ema.optimization_step if ema is not None else None)
    return _swap_in(run, tmp)


def save_sharded_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: TrainState,
                            cfg: TrainConfig, task_name: str, accelerator: Accelerator, ema: EMAModel | None = None
                            ) -> Path:
    """Collective: every rank writes its share of a distributed checkpoint (an FSDP2 model's shards, or a DDP
    model's replicated tensors spread over the ranks) into checkpoint.tmp, then rank 0 adds trainer.json and swaps
    it in."""
    tmp = run / (CHECKPOINT + ".tmp")
    if accelerator.is_main_process:
        _fresh(tmp)
    accelerator.wait_for_everyone()
    sharding.save_shards(tmp / sharding.SHARDS, model, opt, _ema_state(model, ema))
    if accelerator.is_main_process:
        _write_meta(tmp, state, cfg, task_name, sharded=sharding.is_sharded(model), layout=DCP,
                    processes=accelerator.num_processes, ema_step=ema.optimization_step if ema is not None else None)
        _swap_in(run, tmp)
    accelerator.wait_for_everyone()
    return run / CHECKPOINT


def _ema_state(model: torch.nn.Module, ema: EMAModel | None) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA weights by parameter name, as a distributed checkpoint's "ema" entry (none without an EMA)."""
    if ema is None:
        return {}
    return {"ema": dict(zip(_trainable_names(model), ema.shadow_params, strict=True))}


def load_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    ema: EMAModel | None) -> TrainState:
    """Weights, optimizer state and EMA into the given objects; returns the saved step count and history."""
    ckpt = Path(run) / CHECKPOINT
    meta = read_json(ckpt / TRAINER)
    sharded = sharding.is_sharded(model)
    if bool(meta.get("sharded")) != sharded:
        raise InvalidInput(f"{ckpt} was written {'with' if meta.get('sharded') else 'without'} sharding: resume "
                           f"with the --sharding it was trained with ({meta['config'].get('sharding', 'ddp')})")
    if meta.get("layout", DCP if meta.get("sharded") else SAFETENSORS) == DCP:  # any number of processes
        ema = ema if meta.get("ema_step") is not None else None
        sharding.load_shards(ckpt / sharding.SHARDS, model, opt, _ema_state(model, ema))
        if ema is not None:
            ema.optimization_step = meta["ema_step"]
    else:
        load_trainable_state(model, load_file(ckpt / MODEL))
        if opt is not None:
            opt.load_state_dict(_optimizer_state(ckpt, meta))
    if ema is not None and (ckpt / EMA).exists():
        ema.shadow_params = ema_by_name(model, load_file(ckpt / EMA), ckpt)
        ema.optimization_step = meta["ema_step"]
    return TrainState(step=meta["step"], elapsed_s=meta["elapsed_s"], history=meta["history"],
                      planned_steps=meta.get("planned_steps"))


def _optimizer_state(ckpt: Path, meta: dict) -> dict:
    """The optimizer's state dict: optimizer.pt, or an older vlv's moments flattened into safetensors."""
    if (ckpt / OPTIMIZER).exists():
        return torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in load_file(ckpt / LEGACY_OPTIMIZER).items():  # "<param id>.<name>"
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters the optimizer and the EMA hold, in their order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def ema_by_name(model: torch.nn.Module, shadow: dict[str, torch.Tensor], ckpt: Path) -> list[torch.Tensor]:
    """The EMA weights in the model's trainable order, matched by name and shape (a checkpoint of an older vlv,
    keyed 0, 1, ..., by position, when its count and shapes fit)."""
    names = _trainable_names(model)
    if set(shadow) == {str(i) for i in range(len(shadow))}:
        shadow = {n: shadow[str(i)] for i, n in enumerate(names) if str(i) in shadow}
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(names) - set(shadow)), sorted(set(shadow) - set(names))
    bad = [n for n in names if n in shadow and shadow[n].shape != params[n].shape]
    if missing or unexpected or bad:
        raise InvalidInput(f"{ckpt}: its EMA weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, other shapes {bad[:3]})")
    return [shadow[n] for n in names]


def _fresh(tmp: Path) -> Path:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _write_meta(tmp: Path, state: TrainState, cfg: TrainConfig, task_name: str, **extra: Any) -> None:
    meta = {"task": task_name, "step": state.step, "elapsed_s": state.elapsed_s, "config": asdict(cfg),
            "history": state.history, "planned_steps": state.planned_steps, **extra}
    (tmp / TRAINER).write_text(json.dumps(meta, indent=1))  # inside tmp: the swap makes it atomic


def _swap_in(run: Path, tmp: Path) -> Path:
    """Replace run/checkpoint by the finished tmp with renames: a kill leaves the old or the new one, whole."""
    final, old = run / CHECKPOINT, run / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
