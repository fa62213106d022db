"""One accelerate training loop for every stage: teacher VAE, teacher UNet, stage 1, the LM, stage 2.

A stage is a :class:`Task`: it names its trainable module and computes ``loss(model, batch)``.
The loop owns everything else: AdamW, warmup + cosine schedule, gradient clipping, mixed precision,
EMA, progress bar, time budget, and checkpoints that survive a kill.

Determinism: the batch of step k on process r is a pure function of (seed, k, r), and its random draws (noise,
timesteps) of (seed, k) and the sample's place in the global batch, so a run resumed from a checkpoint takes
exactly the steps an uninterrupted run would have taken (the checkpoint needs only weights, optimizer moments and
the step count), and N processes take the steps one process would at the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, DistributedType
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlv.diffusion import Draws
from vlv.errors import InvalidInput, NonFiniteLoss
from vlv.modeling import load_trainable_state, trainable_state
from vlv.training import sharding
from vlv.training.config import TrainConfig

CHECKPOINT = "checkpoint"


class Task(Protocol):
    """What a stage supplies to the loop."""

    name: str

    def trainable(self) -> torch.nn.Module:
        """The module whose parameters with requires_grad train; frozen parts live elsewhere."""

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1) -> Any:
        """The batch of a (micro-)step: a pure function of (step, rank, world_size), so resume is exact; the
        samples are ``vlv.data.sampling.step_indices``' (an epoch reads each once, ranks never overlap). The loop asks
        for steps in order; with gradient accumulation A, optimiser step k reads micro-steps k*A ... k*A + A-1."""

    def loss(self, model: torch.nn.Module, batch: Any, draws: Draws) -> torch.Tensor:
        """Scalar loss; ``model`` is the (possibly DDP-wrapped) trainable module. Random draws come from ``draws``
        (per sample of the global batch); a loss averaged over tokens averages over all ranks' (``across_ranks``)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics on held-out data with the given weights (EMA when the loop keeps one)."""

    # Optional, for --sharding fsdp2 / zero2 (default: vlv.training.sharding.shard of the trainable module):
    # def shard(self, mesh, policy, reshard_after_forward: bool) -> None: fully_shard the trainable module in place


@dataclass
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # loss and eval rows, for curves
    planned_steps: int | None = None  # the step count a budgeted run fixed for itself
    done: bool = False  # reached its last step (not stopped by a signal or a time limit)


# A budgeted run times steps 2..PLAN_AFTER (step 1 pays one-off costs), then plans its length, and re-plans every
# REPLAN_EVERY steps from its average pace since step 1: a CPU's pace drifts over a run, either way, so no single
# early plan holds. The cosine follows the current plan; a re-plan moves the schedule's progress by the plan's
# relative change.
PLAN_AFTER = 20
REPLAN_EVERY = 50


def plan_steps(budget_minutes: float, elapsed_s: float, seconds_per_step: float, min_steps: int) -> int:
    """How many steps fill the budget at the measured pace: faster hardware simply trains further.

    The count is saved with the checkpoint, so a resume continues the same schedule and a finished run's re-run
    does nothing; it never drops below the steps already taken.
    """
    remaining = max(0.0, 60 * budget_minutes - elapsed_s)
    return max(min_steps, min_steps + int(remaining / max(seconds_per_step, 1e-6)))


def _plan_due(state: TrainState, start_step: int) -> bool:
    """Whether a budgeted run (re)plans its length after this step: PLAN_AFTER steps into this process, then
    every REPLAN_EVERY steps."""
    done = state.step - start_step
    return done == PLAN_AFTER if state.planned_steps is None else done > PLAN_AFTER and done % REPLAN_EVERY == 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine or linear decay to lr * min_lr_ratio (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of a micro-step; every rank uses it (each keeps its rows of the draws, see Draws)."""
    return (seed * 1_000_003 + step) * 1009


def across_ranks(count: torch.Tensor) -> torch.Tensor:
    """A per-rank count summed over all ranks (one device all-reduce, no host sync); itself on one process.

    A loss that is a mean over a variable number of items (tokens) divides by this and multiplies by the world
    size: DDP then averages gradients to the global per-item mean, as one process would compute it.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.clone()
        torch.distributed.all_reduce(count)
    return count


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator: precision and gradient accumulation from the config, the GPU when there is one."""
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=cfg.grad_accum)


def global_batch(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, int]:
    """Samples per optimiser step: per process x processes x accumulation (the paper's figure is 512)."""
    n = accelerator.num_processes
    return {"per_process": cfg.batch_size, "processes": n, "grad_accum": cfg.grad_accum,
            "global": cfg.batch_size * n * cfg.grad_accum}


# ------------------------------------------------------------------------------------- checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMAModel | None,
                    state: TrainState, cfg: TrainConfig, task_name: str) -> Path:
    """Write run/checkpoint atomically: build checkpoint.tmp, then swap it in with renames."""
    tmp = run / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "model.safetensors")
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    if ema is not None:
        save_file(dict(zip(_trainable_names(model), (p.contiguous() for p in ema.shadow_params), strict=True)),
                  tmp / "ema.safetensors")
    meta = _trainer_meta(state, cfg, task_name, optimizer=opt_meta,
                         ema_step=ema.optimization_step if ema is not None else None)
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    return _swap_in(run, tmp)


def _trainer_meta(state: TrainState, cfg: TrainConfig, task_name: str, **extra: Any) -> dict:
    return {"task": task_name, "step": state.step, "elapsed_s": state.elapsed_s, "config": asdict(cfg),
            "history": state.history, "planned_steps": state.planned_steps, **extra}


def _swap_in(run: Path, tmp: Path) -> Path:
    """Replace run/checkpoint by the finished tmp with renames: a kill leaves the old or the new one, whole."""
    final, old = run / CHECKPOINT, run / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: TrainState,
                            cfg: TrainConfig, task_name: str, accelerator: Accelerator) -> Path:
    """Collective: every rank writes its shards into checkpoint.tmp, then rank 0 adds trainer.json and swaps it in."""
    tmp = run / (CHECKPOINT + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    sharding.save_shards(tmp / sharding.SHARDS, model, opt)
    if accelerator.is_main_process:
        meta = _trainer_meta(state, cfg, task_name, sharded=True, processes=accelerator.num_processes)
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        _swap_in(run, tmp)
    accelerator.wait_for_everyone()
    return run / CHECKPOINT


def load_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    ema: EMAModel | None) -> TrainState:
    ckpt = run / CHECKPOINT
    meta = json.loads((ckpt / "trainer.json").read_text())
    sharded = sharding.is_sharded(model)
    if bool(meta.get("sharded")) != sharded:
        raise InvalidInput(f"{ckpt} was written {'with' if meta.get('sharded') else 'without'} sharding: resume "
                           f"with the --sharding it was trained with ({meta['config'].get('sharding', 'ddp')})")
    if sharded:
        sharding.load_shards(ckpt / sharding.SHARDS, model, opt)
    else:
        load_trainable_state(model, load_file(ckpt / "model.safetensors"))
        if opt is not None:
            _optimizer_from_tensors(opt, load_file(ckpt / "optimizer.safetensors"), meta["optimizer"])
    if ema is not None and (ckpt / "ema.safetensors").exists():
        ema.shadow_params = ema_by_name(model, load_file(ckpt / "ema.safetensors"), ckpt)
        ema.optimization_step = meta["ema_step"]
    return TrainState(step=meta["step"], elapsed_s=meta["elapsed_s"], history=meta["history"],
                      planned_steps=meta.get("planned_steps"))


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


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / CHECKPOINT / "trainer.json").exists()


# Settings a resumed run may change: how it reports, checkpoints, stops and reads data, not what it computes.
FREE_ON_RESUME = frozenset({"progress", "max_minutes", "stop_after", "checkpoint_minutes", "checkpoint_every",
                            "log_every", "eval_every", "resume", "num_workers", "on_bad_image"})


def changed_settings(saved: dict[str, dict], requested: dict[str, dict]) -> list[str]:
    """``section.field`` of every setting that differs between a run's record and a new request."""
    out = []
    for section, fields in requested.items():
        old = saved.get(section, {})
        free = FREE_ON_RESUME | ({"steps"} if fields.get("budget_minutes") else set())  # a budget plans its steps
        out += [f"{section}.{k}" for k, v in fields.items() if k not in free and k in old and _json(old[k]) != _json(v)]
    return out


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists alike, as the record stores them


def check_request(run: Path, record_file: str, requested: dict[str, dict], cfg: TrainConfig) -> None:
    """What a training command checks before it loads anything: the launch fits the sharding, and a started run
    dir is resumed with its own settings."""
    if cfg.sharding != "ddp" and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise InvalidInput(f"--sharding {cfg.sharding} needs several processes: launch with torchrun or "
                           "accelerate launch")
    check_resume(run, record_file, requested, cfg.resume == "override")


def check_resume(run: Path, record_file: str, requested: dict[str, dict], override: bool = False,
                 checkpoint_dir: Path | None = None) -> None:
    """A run dir with a checkpoint resumes only with the settings its record holds (unless ``resume=override``):
    a changed lr, batch, seed or recipe would otherwise go on silently from weights trained another way."""
    run = Path(run)
    record = run / record_file
    if override or not has_checkpoint(checkpoint_dir or run) or not record.is_file():
        return
    diff = changed_settings(json.loads(record.read_text()), requested)
    if diff:
        raise InvalidInput(f"{run} was started with other settings ({', '.join(diff)}): run its command again to "
                           f"resume, use another --out, or pass --resume override")


# ------------------------------------------------------------------------------------------- loop
class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current step and returns."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _decide(accelerator: Accelerator, bad_step: int, stop: bool, out_of_time: bool, checkpoint_due: bool,
            planned: int | None) -> tuple[bool, bool, bool, int | None, int]:
    """The step's control-flow decisions, the same on every rank: a signal to any rank stops all, and so does a
    non-finite loss on any rank (its first step); the time limit, the time-based checkpoint and a budgeted run's
    plan are rank 0's (its clock). One small all-reduce."""
    if accelerator.num_processes == 1:
        return stop, out_of_time, checkpoint_due, planned, bad_step
    main = accelerator.is_main_process
    t = torch.tensor([int(stop), int(out_of_time and main), int(checkpoint_due and main),
                      (planned if planned is not None else -1) if main else -1, bad_step], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    stop_all, late, due, plan, bad = t.tolist()
    return bool(stop_all), bool(late), bool(due), (plan if plan >= 0 else None), bad


def train(task: Task, cfg: TrainConfig, run: Path, accelerator: Accelerator | None = None) -> TrainState:
    """Train ``task`` into ``run`` (resuming from run/checkpoint when present); returns the final state.

    On return the trainable module holds the final weights, or the EMA weights when cfg.ema_decay is set.
    """
    run = Path(run)
    accelerator = accelerator or make_accelerator(cfg)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise InvalidInput(f"launched with accelerate's {accelerator.distributed_type.value} plugin: vlv shards "
                           "itself (--sharding fsdp2 or zero2) under a plain launch (launch/ddp-*.yaml or torchrun)")
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise ValueError(f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-steps, the "
                         f"config {cfg.grad_accum}: build it with make_accelerator(cfg)")
    model = task.trainable()
    sharded = cfg.sharding != "ddp"
    if sharded:  # in place, before the optimizer sees the parameters: it then holds only this rank's shards
        model.to(accelerator.device)
        shard = getattr(task, "shard", None) or (lambda *a, **k: sharding.shard(model, *a, **k))
        shard(sharding.mesh_for(accelerator.device), sharding.precision_policy(cfg.mixed_precision),
              reshard_after_forward=cfg.sharding == "fsdp2")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{task.name}: nothing to train")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4) if cfg.ema_decay else None
    state = load_checkpoint(run, model, opt, ema) if has_checkpoint(run) else TrainState()
    if state.planned_steps is not None:
        cfg = replace(cfg, steps=state.planned_steps)
    run.mkdir(parents=True, exist_ok=True)
    if sharded:  # FSDP2 syncs gradients itself; the optimizer is still accelerate's (accumulation, precision)
        wrapped, opt = model, accelerator.prepare(opt)
    else:
        wrapped, opt = accelerator.prepare(model, opt)
    if ema is not None:
        ema.to(accelerator.device)
    n_params = sum(p.numel() for p in params)
    sizes = global_batch(cfg, accelerator)
    if accelerator.is_main_process:
        print(f"[{task.name}] {n_params / 1e6:.2f} M trainable parameters; step {state.step}/{cfg.steps}; global "
              f"batch {sizes['global']} = {cfg.batch_size} per process x {sizes['processes']} process(es) x "
              f"{cfg.grad_accum} accumulation step(s)")

    rank, device = accelerator.process_index, accelerator.device
    t_start, last_ckpt, last_ckpt_time = time.perf_counter(), state.step, time.perf_counter()
    elapsed0, start_step = state.elapsed_s, state.step
    bar = tqdm(total=cfg.steps, initial=state.step, desc=task.name, unit="step",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    running, pace_t0 = None, None  # running: the smoothed loss, kept on the device between log steps
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    with _StopFlag() as flag:
        while state.step < cfg.steps:
            if cfg.budget_minutes and state.step - start_step == 1:
                pace_t0 = time.perf_counter()  # after the first step's one-off costs
            for group in opt.param_groups:
                group["lr"] = lr_at(state.step, cfg)
            value = torch.zeros((), device=device)
            for micro in range(state.step * cfg.grad_accum, (state.step + 1) * cfg.grad_accum):
                gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, micro))
                draws = Draws(gen, rank, accelerator.num_processes)
                batch = task.batch(micro, rank, cfg.batch_size, device, world_size=accelerator.num_processes)
                with accelerator.accumulate(wrapped):  # syncs and steps only on the last micro-step
                    if sharded:
                        wrapped.set_requires_gradient_sync(accelerator.sync_gradients)
                    with accelerator.autocast():
                        loss = task.loss(wrapped, batch, draws)
                    accelerator.backward(loss)  # the loss / grad_accum
                    if cfg.grad_clip and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                value += loss.detach().float() / cfg.grad_accum
            if ema is not None:
                ema.step(params)
            state.step += 1
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(value), state.step, bad_step)
            state.elapsed_s = elapsed0 + time.perf_counter() - t_start
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            # Steps between decision points run without a host sync; the decisions (stop, checkpoint, plan) are
            # taken at step numbers every rank knows, once for all ranks (see _decide). A checkpoint is only ever
            # written at a decision step, so a non-finite loss is always seen before it could be saved.
            plan_due = pace_t0 is not None and _plan_due(state, start_step)
            final = state.step == cfg.steps
            due = state.step - last_ckpt >= cfg.checkpoint_every
            out_of_time = cfg.stop_after is not None and state.step - start_step >= cfg.stop_after
            stop = False
            if state.step % cfg.log_every == 0 or final or plan_due or due or out_of_time:
                shown = running.item()
                bar.set_postfix(loss=f"{shown:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
                if state.step % cfg.log_every == 0 or final:
                    state.history.append({"step": state.step, "loss": shown, "elapsed_s": round(state.elapsed_s, 2)})
                now = time.perf_counter()
                planned = None
                if plan_due:
                    pace = (now - pace_t0) / (state.step - start_step - 1)
                    planned = plan_steps(cfg.budget_minutes, state.elapsed_s, pace, state.step)
                stop, late, due_now, planned, bad = _decide(
                    accelerator, int(bad_step), flag.stop,
                    cfg.max_minutes is not None and now - t_start > 60 * cfg.max_minutes,
                    now - last_ckpt_time > 60 * cfg.checkpoint_minutes, planned)
                if bad >= 0:
                    raise NonFiniteLoss(f"{task.name}: the loss is not finite at step {bad}; stopped, the checkpoint "
                                        f"of step {last_ckpt} is kept (lower the lr, or check the data)")
                out_of_time, due = out_of_time or late, due or due_now
                if planned is not None:
                    state.planned_steps = planned
                    cfg = replace(cfg, steps=planned)
                    bar.total = cfg.steps
                    final = state.step == cfg.steps
            if cfg.eval_every and (state.step % cfg.eval_every == 0 or final):
                metrics = _evaluate(task, accelerator.unwrap_model(wrapped), ema)
                metrics.update(step=state.step, elapsed_s=round(state.elapsed_s, 2))
                state.history.append({"eval": metrics})
                bar.write(f"[{task.name}] step {state.step}: " + json.dumps(metrics))
            if due or out_of_time or stop or final:
                if sharded:
                    save_sharded_checkpoint(run, wrapped, opt, state, cfg, task.name, accelerator)
                elif accelerator.is_main_process:
                    save_checkpoint(run, accelerator.unwrap_model(wrapped), opt, ema, state, cfg, task.name)
                accelerator.wait_for_everyone()
                last_ckpt, last_ckpt_time = state.step, time.perf_counter()
            if out_of_time or stop:
                break
    bar.close()
    state.done = state.step >= cfg.steps
    model = accelerator.unwrap_model(wrapped)
    if ema is not None:
        ema.copy_to([p for p in model.parameters() if p.requires_grad])
    return state


def _evaluate(task: Task, model: torch.nn.Module, ema: EMAModel | None) -> dict[str, float]:
    """Evaluate with EMA weights when kept, then put the training weights back."""
    params = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model)
        model.train(was_training)
    finally:
        if ema is not None:
            ema.restore(params)
    return metrics
