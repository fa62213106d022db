"""One accelerate training loop for every stage: teacher VAE, teacher UNet, stage 1, the LM, stage 2.

A stage is a :class:`Task`: it names its trainable module and computes ``loss(model, batch, draws)``. The loop
owns everything else: AdamW, warmup + cosine schedule, gradient clipping, mixed precision, EMA, progress bar,
when to stop (:mod:`vlv.training.stop`), checkpoints that survive a kill (:mod:`vlv.training.checkpoint`) and what
the run reports (:mod:`vlv.training.tracking`).

Determinism: the batch of step k on process r is a pure function of (seed, k, r), and its random draws (noise,
timesteps) of (seed, k) and the sample's place in the global batch (:mod:`vlv.training.draws`), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run would have taken (the checkpoint needs
only weights, optimizer moments and the step count), and N processes take the steps one process would at the
same global batch: a task's loss is a mean over its items, weighted over all ranks' items by the loop.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import InitProcessGroupKwargs
from diffusers.training_utils import EMAModel

from vlv.errors import InvalidInput, NonFiniteLoss
from vlv.progress import tqdm
from vlv.training import sharding, tracking
from vlv.training.checkpoint import (
    TrainState,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from vlv.training.config import TrainConfig
from vlv.training.draws import Draws, step_draws
from vlv.training.stop import Clock, StopFlag, StopPolicy

EXPORTS = "exports"  # run/exports/step_N: --export-every's loadable dirs


class Loss(NamedTuple):
    """What a task's loss returns: this rank's mean loss over ``count`` items (samples, or tokens)."""

    mean: torch.Tensor
    count: torch.Tensor | int


class Task(Protocol):
    """What a stage supplies to the loop."""

    name: str
    # Optional: what a loss's count counts ("images", "tokens"), for the trackers' throughput (default "items").
    # unit: str

    def trainable(self) -> torch.nn.Module:
        """The module whose parameters with requires_grad train; frozen parts live elsewhere."""

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1) -> Any:
        """The batch of a (micro-)step: a pure function of (step, rank, world_size), so resume is exact; the
        samples are ``vlv.data.sampling.step_indices``' (an epoch reads each once, ranks never overlap). The loop asks
        for steps in order; with gradient accumulation A, optimiser step k reads micro-steps k*A ... k*A + A-1."""

    def loss(self, model: torch.nn.Module, batch: Any, draws: Draws) -> Loss | tuple[torch.Tensor, Any]:
        """(mean loss, item count) on this rank; ``model`` is the (possibly DDP-wrapped) trainable module. Random
        draws come from ``draws`` (per sample of the global batch). The loop weighs ranks by their counts."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float | tracking.ImageGrid | tracking.Texts]:
        """Metrics on held-out data with the given weights (EMA when the loop keeps one), and samples to show
        (reconstructions, captions: written to RUN/val and sent to the trackers)."""

    # Optional, for --export-every: write a loadable dir of the trainable model (its save_pretrained) into out;
    # the loop calls it on one process, with whole weights (the EMA's when kept):
    # def export(self, out: Path) -> None

    # Optional, for --sharding fsdp2 / zero2 (default: vlv.training.sharding.shard of the trainable module):
    # def shard(self, mesh, policy, reshard_after_forward: bool) -> None: fully_shard the trainable module in place


def lr_at(step: int, cfg: TrainConfig, total: int | None) -> float:
    """Linear warmup, then cosine or linear decay over ``total`` steps to lr * min_lr_ratio (or constant); a
    budgeted run that has not planned its ``total`` yet stays at the peak."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = 0.0 if total is None else min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    decay = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def global_mean(loss: torch.Tensor, count: torch.Tensor | int, world_size: int
                ) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(a rank's mean over its ``count`` items weighted by count x world size / all ranks' count, all ranks' count):
    DDP's gradient average is then the mean over every rank's items, as one process takes it. One device
    all-reduce of the count, no host sync; one process returns the loss untouched (bit for bit)."""
    if world_size == 1:
        return loss, count
    count = count.float() if torch.is_tensor(count) else torch.full((), float(count), device=loss.device)
    total = count.clone()
    torch.distributed.all_reduce(total)
    return loss * (count * world_size / total), total


def make_accelerator(cfg: TrainConfig, run: Path | None = None) -> Accelerator:
    """The run's Accelerator: precision and gradient accumulation from the config, the GPU when there is one, a
    process-group timeout long enough for the largest save (NCCL's default, 10 minutes, is not), and the tracker
    of ``cfg.report_to`` writing into ``run``/logs."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.timeout_minutes))
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[timeout],
                       **tracking.tracking_kwargs(cfg.report_to, run))


def global_batch(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, int]:
    """Samples per optimiser step: per process x processes x accumulation (the paper's figure is 512)."""
    n = accelerator.num_processes
    return {"per_process": cfg.batch_size, "processes": n, "grad_accum": cfg.grad_accum,
            "global": cfg.batch_size * n * cfg.grad_accum}


@dataclass
class _Run:
    """What the steps work on, built once by :func:`train`."""

    task: Task
    cfg: TrainConfig
    dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared: DDP-wrapped, or sharded in place
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    ema: EMAModel | None
    policy: StopPolicy

    @property
    def sharded(self) -> bool:
        return self.cfg.sharding != "ddp"


@dataclass
class _Marks:
    """The last checkpoint (step, clock time) and the first step with a non-finite loss (on the device, -1); for
    the trackers, since the last log step (clock time, step): the summed step losses and items (on the device) and
    the seconds spent on evaluations, exports and checkpoints (not steps, so not in the throughput)."""

    step: int
    time: float
    bad: torch.Tensor
    losses: torch.Tensor
    items: torch.Tensor
    logged: float
    logged_step: int
    paused: float = 0.0


def train(task: Task, cfg: TrainConfig, run: Path, accelerator: Accelerator | None = None,
          clock: Clock = time.perf_counter) -> TrainState:
    """Train ``task`` into ``run`` (resuming from run/checkpoint when present); returns the final state.

    The trainable module trains in train mode (its own ``train()`` keeps frozen parts in eval) and evaluates in
    eval mode. On return it is in eval mode and holds the final weights, or the EMA weights when cfg.ema_decay is
    set.
    The Accelerator's trackers (``make_accelerator``'s for ``cfg.report_to``, or any accelerate takes in
    ``log_with``) get the mean loss, lr and items per second at log steps, and each evaluation's metrics and
    samples (:mod:`vlv.training.tracking`); they are closed on return.
    ``clock`` times the run (limits, budget, time-based checkpoints, throughput): tests pass a fake one.
    """
    run = Path(run)
    accelerator = accelerator or make_accelerator(cfg, run)
    _check_launch(accelerator, cfg)
    if cfg.export_every and getattr(task, "export", None) is None:
        raise InvalidInput(f"--export-every: {task.name} has no loadable export; drop the flag")
    # 1. The trainable module (sharded in place when asked), AdamW over what trains, and its EMA.
    model = _trainable(task, cfg, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4) if cfg.ema_decay else None
    # 2. Resume: weights, moments, EMA, the step count and a budget's plan.
    state = load_checkpoint(run, model, opt, ema) if has_checkpoint(run) else TrainState()
    run.mkdir(parents=True, exist_ok=True)
    model, opt = _prepare(accelerator, model, opt, ema, sharded=cfg.sharding != "ddp")
    # from_pretrained leaves a model in eval mode: dropout off, and transformers' gradient checkpointing (active
    # only in training mode) off. The modules' own train() keeps their frozen parts in eval.
    model.train()
    r = _Run(task, cfg, run, accelerator, model, opt, params, ema, StopPolicy.of(cfg, state.planned_steps, clock))
    _announce(r, state)
    accelerator.init_trackers(task.name, config=tracking.hparams(asdict(cfg)))  # those of make_accelerator's
    try:
        _steps(r, state, clock)
    finally:
        tracking.finish(accelerator)
    # 4. The final weights: the EMA's when kept.
    state.done = r.policy.finished(state.step)
    if ema is not None:
        ema.copy_to([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
    model.eval()  # handed back for saving and use, as from_pretrained would give it
    return state


def _steps(r: _Run, state: TrainState, clock: Clock) -> None:
    """3. Steps until the policy, a signal or a non-finite loss ends the run."""
    cfg, accelerator = r.cfg, r.accelerator
    bar = tqdm(total=r.policy.total, initial=state.step, desc=r.task.name, unit="step",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    zero, start = torch.zeros((), device=accelerator.device), clock()
    marks = _Marks(state.step, start, torch.full((), -1, dtype=torch.long, device=accelerator.device),
                   zero.clone(), zero.clone(), start, state.step)
    r.policy.start(state.step, state.elapsed_s)
    running = None  # the smoothed loss, kept on the device between log steps
    with StopFlag() as flag:
        while not r.policy.finished(state.step):
            # 3a. One optimiser step over grad_accum micro-steps, with no host sync.
            r.policy.step_begins(state.step)
            value, items = _optimizer_step(r, state.step)
            state.step += 1
            marks.bad = torch.where((marks.bad < 0) & ~torch.isfinite(value), state.step, marks.bad)
            marks.losses += value
            marks.items += items
            state.elapsed_s = r.policy.elapsed_s()
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            # 3b. At decision steps: log; stop, checkpoint and plan, decided once for all ranks.
            save, stop = _decide(r, state, marks, running, flag.stop, bar)
            finished = r.policy.finished(state.step)
            evaluate = cfg.eval_every and (state.step % cfg.eval_every == 0 or finished)
            export = cfg.export_every and state.step % cfg.export_every == 0 and not finished
            save = save or stop or finished
            if evaluate or export or save:
                began = clock()
                # 3c. Evaluate (EMA weights when kept).
                if evaluate:
                    _record_eval(r, state, bar)
                # 3d. A loadable export of the weights so far (the end's is the run dir itself).
                if export:
                    _export(r, state.step)
                # 3e. Checkpoint when due, before stopping, and at the end.
                if save:
                    _save(r, state)
                    marks.step, marks.time = state.step, clock()
                marks.paused += clock() - began  # not step time: kept out of the throughput
            if stop:
                break
    bar.close()


def _check_launch(accelerator: Accelerator, cfg: TrainConfig) -> None:
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise InvalidInput(f"launched with accelerate's {accelerator.distributed_type.value} plugin: vlv shards "
                           "itself (--sharding fsdp2 or zero2) under a plain launch (launch/ddp-*.yaml or torchrun)")
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise ValueError(f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-steps, the "
                         f"config {cfg.grad_accum}: build it with make_accelerator(cfg)")


def _trainable(task: Task, cfg: TrainConfig, accelerator: Accelerator) -> torch.nn.Module:
    """The task's trainable module; sharded in place before the optimizer sees it, so that holds only shards."""
    model = task.trainable()
    if cfg.sharding != "ddp":
        model.to(accelerator.device)
        shard = getattr(task, "shard", None) or (lambda *a, **k: sharding.shard(model, *a, **k))
        shard(sharding.mesh_for(accelerator.device), sharding.precision_policy(cfg.mixed_precision),
              reshard_after_forward=cfg.sharding == "fsdp2")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{task.name}: nothing to train")
    return model


def _prepare(accelerator: Accelerator, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMAModel | None,
             sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """accelerate's wrap; sharded, FSDP2 syncs gradients itself and only the optimizer goes through accelerate
    (accumulation, precision)."""
    if sharded:
        model, opt = model, accelerator.prepare(opt)
    else:
        model, opt = accelerator.prepare(model, opt)
    if ema is not None:
        ema.to(accelerator.device)
    return model, opt


def _announce(r: _Run, state: TrainState) -> None:
    if not r.accelerator.is_main_process:
        return
    cfg, sizes = r.cfg, global_batch(r.cfg, r.accelerator)
    total = r.policy.total if r.policy.total is not None else "(planned from the budget)"
    print(f"[{r.task.name}] {sum(p.numel() for p in r.params) / 1e6:.2f} M trainable parameters; step "
          f"{state.step}/{total}; global batch {sizes['global']} = {cfg.batch_size} per process x "
          f"{sizes['processes']} process(es) x {cfg.grad_accum} accumulation step(s)")


def _optimizer_step(r: _Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimiser step ``step`` over its grad_accum micro-steps (and the EMA's); returns its mean loss and the
    items it was taken over, on all ranks (device)."""
    cfg, accelerator = r.cfg, r.accelerator
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    for group in r.opt.param_groups:
        group["lr"] = lr_at(step, cfg, r.policy.total)
    value, items = torch.zeros((), device=device), torch.zeros((), device=device)
    for micro in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        draws = step_draws(cfg.seed, micro, rank, world, device)
        batch = r.task.batch(micro, rank, cfg.batch_size, device, world_size=world)
        with accelerator.accumulate(r.model):  # syncs and steps only on the last micro-step
            if r.sharded:
                r.model.set_requires_gradient_sync(accelerator.sync_gradients)
            with accelerator.autocast():
                loss, count = global_mean(*r.task.loss(r.model, batch, draws), world)
            accelerator.backward(loss)  # the loss / grad_accum
            if cfg.grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(r.params, cfg.grad_clip)
            r.opt.step()
            r.opt.zero_grad(set_to_none=True)
        value += loss.detach().float() / cfg.grad_accum
        items += count
    if r.ema is not None:
        r.ema.step(r.params)
    return value, items


def _decide(r: _Run, state: TrainState, marks: _Marks, running: torch.Tensor, signalled: bool, bar: tqdm
            ) -> tuple[bool, bool]:
    """(checkpoint due, stop) after a step. Steps between decision points run without a host sync; decisions are
    taken at step numbers every rank knows, once for all ranks (see :func:`_agree`). A checkpoint is only ever
    written at a decision step, so a non-finite loss is always seen before it could be saved."""
    cfg, policy, step = r.cfg, r.policy, state.step
    log, plan_due = step % cfg.log_every == 0 or policy.finished(step), policy.plan_due(step)
    due, stop = step - marks.step >= cfg.checkpoint_every, policy.steps_out(step)
    if not (log or plan_due or due or stop):
        return False, False
    shown = running.item()
    lr = r.opt.param_groups[0]["lr"]
    bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}")
    if log:
        state.history.append({"step": step, "loss": shown, "elapsed_s": round(state.elapsed_s, 2)})
    now = policy.clock()
    if log:
        _report(r, step, lr, marks, now)
    planned = policy.plan(step, state.elapsed_s, now) if plan_due else None
    signal, late, due_now, planned, bad = _agree(r.accelerator, int(marks.bad), signalled, policy.time_out(now),
                                                 now - marks.time > 60 * cfg.checkpoint_minutes, planned)
    if bad >= 0:
        raise NonFiniteLoss(f"{r.task.name}: the loss is not finite at step {bad}; stopped, the checkpoint of step "
                            f"{marks.step} is kept (lower the lr, or check the data)")
    if planned is not None:
        state.planned_steps = policy.planned = bar.total = planned
    return due or due_now, stop or late or signal


def _report(r: _Run, step: int, lr: float, marks: _Marks, now: float) -> None:
    """To the trackers (main process): the mean step loss, lr and items per second of the steps since the last log
    step. Read after the log step's own sync (``running.item()``), so the steps between stay sync-free."""
    if r.accelerator.trackers:  # only the main process holds them
        losses, items = torch.stack([marks.losses, marks.items]).tolist()
        seconds = now - marks.logged - marks.paused
        values = {"train/loss": losses / (step - marks.logged_step), "train/lr": lr}
        if seconds > 0:
            values[f"train/{getattr(r.task, 'unit', 'items')}_per_s"] = items / seconds
        r.accelerator.log(values, step=step)
    marks.losses.zero_()
    marks.items.zero_()
    marks.logged, marks.logged_step, marks.paused = now, step, 0.0


def _agree(accelerator: Accelerator, bad_step: int, stop: bool, out_of_time: bool, checkpoint_due: bool,
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


def _record_eval(r: _Run, state: TrainState, bar: tqdm) -> None:
    """An evaluation: its scalars into the history and to the trackers, its samples into RUN/val and to the
    trackers."""
    metrics, samples = tracking.split(_evaluate(r.task, r.accelerator.unwrap_model(r.model), r.ema))
    r.model.train()  # whatever modes the evaluation left behind (pipelines, generate), the steps train
    r.accelerator.log({tracking.EVAL_PREFIX + k: v for k, v in metrics.items()}, step=state.step)
    paths = tracking.record_samples(r.accelerator, r.dir, state.step, samples)
    metrics.update(step=state.step, elapsed_s=round(state.elapsed_s, 2))
    state.history.append({"eval": metrics})
    bar.write(f"[{r.task.name}] step {state.step}: " + json.dumps(metrics)
              + "".join(f"\n  {key}: {path}" for key, path in zip(samples, paths, strict=False)))


def _save(r: _Run, state: TrainState) -> None:
    """Collective: the checkpoint, with the config as the run now stands (a budget's plan for its steps). Several
    processes write a distributed checkpoint, every rank its share (sharded: its shards; DDP: its part of the
    replicated tensors, which DCP's planner spreads over the ranks), so none waits minutes for rank 0 to write it
    all; one process writes safetensors."""
    cfg = replace(r.cfg, steps=r.policy.total)
    model = r.accelerator.unwrap_model(r.model)
    if r.sharded:
        save_sharded_checkpoint(r.dir, r.model, r.opt, state, cfg, r.task.name, r.accelerator)
    elif r.accelerator.num_processes > 1:
        save_sharded_checkpoint(r.dir, model, r.opt, state, cfg, r.task.name, r.accelerator, ema=r.ema)
    else:
        save_checkpoint(r.dir, model, r.opt, r.ema, state, cfg, r.task.name)
    r.accelerator.wait_for_everyone()


def export_dir(run: Path, step: int) -> Path:
    """Where ``--export-every`` puts the weights of step ``step``."""
    return Path(run) / EXPORTS / f"step_{step}"


def _export(r: _Run, step: int) -> None:
    """Collective: the task's loadable dir of this step's weights (the EMA's when kept), written by one process
    into a temp dir and renamed, so an export dir is whole or absent."""
    final = export_dir(r.dir, step)
    tmp = final.with_name(final.name + ".tmp")

    def write() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        r.task.export(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run exporting the same step again
        tmp.rename(final)

    model = r.accelerator.unwrap_model(r.model)
    if r.ema is not None:
        r.ema.store(r.params)
        r.ema.copy_to(r.params)
    try:
        write_once(model, write)
    finally:
        if r.ema is not None:
            r.ema.restore(r.params)
    if r.accelerator.is_main_process:
        print(f"[{r.task.name}] step {step}: exported to {final}", flush=True)


def write_once(module: torch.nn.Module, write: Callable[[], object]) -> None:
    """Collective: ``write()`` the module's weights (a save_pretrained) on the main process only, the others
    waiting; a sharded module is gathered onto the main process first (every rank takes part). Why: N processes
    writing the same multi-GB files would multiply the disk traffic for one result."""
    state = PartialState()
    with sharding.gathered(module, keep=state.is_main_process):
        if state.is_main_process:
            write()
    state.wait_for_everyone()


def _evaluate(task: Task, model: torch.nn.Module, ema: EMAModel | None) -> dict[str, float]:
    """Evaluate in eval mode with EMA weights when kept, then put the training weights back (the caller puts the
    model back in train mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model)
    finally:
        if ema is not None:
            ema.restore(params)
    return metrics
