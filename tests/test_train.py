import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlv.training import loop
from vlv.training.config import TrainConfig
from vlv.training.loop import PLAN_AFTER, plan_steps, train


class Regression:
    """A toy task: fit y = 3x with one weight; cheap enough to time and resume."""

    name = "toy"

    def __init__(self):
        self.model = torch.nn.Linear(1, 1, bias=False)

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(batch_size, 1, generator=g)
        return x, 3 * x

    def loss(self, model, batch, generator):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def evaluate(self, model):
        return {}


def test_plan_steps_fills_the_budget_and_never_goes_back():
    assert plan_steps(1.0, elapsed_s=0.0, seconds_per_step=0.5, min_steps=4) == 4 + 120
    assert plan_steps(1.0, elapsed_s=60.0, seconds_per_step=0.5, min_steps=7) == 7  # budget spent: stop here


class Clock:
    """The loop's clock, advanced by the task: a paced test that a loaded CI machine cannot slow down."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class SlowStart(Regression):
    """The toy task paced like a CPU run: its first PLAN_AFTER steps are slower than the rest."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock

    def batch(self, step, rank, batch_size, device, world_size=1):
        self.clock.now += 0.02 if step < PLAN_AFTER else 0.005
        return super().batch(step, rank, batch_size, device)


def test_a_budgeted_run_keeps_replanning_so_it_fills_its_budget(tmp_path, monkeypatch):
    # 20 ms steps plan ~120 steps for a 2.4 s budget; from step 20 on a step takes 5 ms, so the re-plans (every
    # REPLAN_EVERY steps, from the average pace) let the run use its budget instead of stopping at ~1 s.
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    cfg = TrainConfig(steps=10**9, batch_size=4, lr=1e-2, budget_minutes=0.04, warmup_steps=10, progress=False)
    state = train(SlowStart(clock), cfg, tmp_path / "run")
    assert state.done and state.step == state.planned_steps > 300
    assert 0.8 < state.elapsed_s / (60 * cfg.budget_minutes) < 1.2


def test_a_finished_budgeted_run_keeps_its_length_on_a_rerun(tmp_path):
    cfg = TrainConfig(steps=10**9, batch_size=4, lr=1e-2, budget_minutes=0.01, warmup_steps=PLAN_AFTER,
                      progress=False)
    task = Regression()
    state = train(task, cfg, tmp_path / "run")
    assert state.done and state.planned_steps is not None and state.step == state.planned_steps >= PLAN_AFTER
    meta = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    assert meta["planned_steps"] == state.planned_steps
    # A re-run finds the plan in the checkpoint: nothing left to do, same length, no re-planning.
    again = train(Regression(), cfg, tmp_path / "run")
    assert again.done and again.step == state.planned_steps == again.planned_steps


def _torchrun(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    worker = Path(__file__).with_name("dist_worker.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _ranks(stdout: str) -> list[tuple[int, int, bool]]:
    rows = re.findall(r"rank (\d): step (\d+) planned (\d+) done (True|False)", stdout)
    return [(int(s), int(p), d == "True") for _, s, p, d in sorted(rows)]


def test_a_signal_to_one_rank_stops_both_at_one_step_with_one_checkpoint(tmp_path):
    """Two processes on different clocks, a budget, a checkpoint due on every tick and a SIGTERM to rank 1 only:
    both ranks stop at the same step with one checkpoint (no hang), and a re-run resumes both to the same end."""
    run = tmp_path / "run"
    r = _torchrun(run, tmp_path, 50)
    assert r.returncode == 0, r.stderr[-3000:]
    (s0, p0, d0), (s1, p1, d1) = _ranks(r.stdout)
    assert s0 == s1 and p0 == p1 and not d0 and not d1 and s0 < p0
    assert sorted(x.name for x in run.iterdir()) == ["checkpoint"]
    assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == s0
    r = _torchrun(run, tmp_path, -1)
    assert r.returncode == 0, r.stderr[-3000:]
    (s0, p0, d0), (s1, p1, d1) = _ranks(r.stdout)
    assert d0 and d1 and s0 == s1 == p0 == p1
    a, b = (load_file(tmp_path / f"rank{i}.safetensors") for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _every_task(data: Path, out: Path, processes: int, inputs: Path | None = None
                ) -> dict[str, dict[str, torch.Tensor]]:
    worker = Path(__file__).with_name("ddp_tasks_worker.py")
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(processes), str(worker), str(data), str(out), *([str(inputs)] if inputs else [])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {f"{name}.rank{i}": load_file(out / f"{name}.rank{i}.safetensors") for name in TASKS
            for i in range(processes)}


TASKS = ("teacher-vae", "teacher-unet", "lm", "stage1", "stage2")


def test_every_task_trains_on_two_processes_as_on_one_at_the_same_global_batch(shapes_data, tmp_path):
    """Teacher VAE and UNet, LM, stage 1 and stage 2, each through its own entry point on 2 processes (DDP, gloo):
    both ranks end with the same weights (a forward outside the wrapped module would let them drift), and those
    equal one process's at the same global batch (noise drawn per sample of the global batch, token losses
    weighted over both ranks' tokens), each task fed the one-process run's inputs (latents, teacher, LM, stage 1)."""
    one = _every_task(shapes_data["train"], tmp_path / "one", 1)
    two = _every_task(shapes_data["train"], tmp_path / "two", 2, inputs=tmp_path / "one")
    for name in TASKS:
        a, b, single = two[f"{name}.rank0"], two[f"{name}.rank1"], one[f"{name}.rank0"]
        assert a.keys() == b.keys() == single.keys() and a, name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        # Not a max: a few parameters (conv biases ahead of a GroupNorm) have a gradient that is 0 in exact
        # arithmetic, so AdamW turns the all-reduce's rounding into lr-sized steps on them; any other draw or
        # weighting than one process's moves most weights by far more than 1e-5.
        diff = torch.cat([(a[k] - single[k]).abs().flatten() for k in a])
        assert (diff > 1e-5).float().mean() < 1e-3, (name, (diff > 1e-5).float().mean().item())


class Diverges(Regression):
    """The toy task whose loss turns NaN from the 25th step on."""

    def batch(self, step, rank, batch_size, device, world_size=1):
        self.step = step
        return super().batch(step, rank, batch_size, device)

    def loss(self, model, batch, generator):
        loss = super().loss(model, batch, generator)
        return loss * float("nan") if self.step >= 24 else loss


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    from vlv.errors import NonFiniteLoss

    cfg = TrainConfig(steps=100, batch_size=4, lr=1e-2, checkpoint_every=10, log_every=7, progress=False)
    task = Diverges()
    with pytest.raises(NonFiniteLoss, match="step 25;.*step 20 is kept"):
        train(task, cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    weights = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert meta["step"] == 20 and all(torch.isfinite(w).all() for w in weights.values())


def test_launch_configs_load_in_accelerate_as_ddp_leaving_precision_to_the_recipe():
    """accelerate parses every shipped config; CPU runs cannot take them (accelerate launches CPU ranks through
    mpirun), so the 2-process tests here go through torchrun, the same loop."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((Path(__file__).parent.parent / "launch").glob("*.yaml"))
    assert [c.name for c in configs] == ["ddp-1node.yaml", "ddp-multinode.yaml"]
    for path in configs:
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == "MULTI_GPU" and cfg.mixed_precision == "no", path.name
    assert load_config_from_file(str(configs[0])).main_process_port == 0  # a free port, picked at launch


class TwoWeights(Regression):
    """The toy with two trainable weights."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.Linear(2, 1, bias=False))


def test_ema_weights_are_saved_by_name_and_a_mismatch_is_refused(tmp_path):
    from safetensors.torch import save_file

    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, ema_decay=0.9, progress=False)
    train(TwoWeights(), replace(cfg, stop_after=2), tmp_path / "run")
    path = tmp_path / "run" / "checkpoint" / "ema.safetensors"
    shadow = load_file(path)
    assert {k: v.shape for k, v in shadow.items()} == {"0.weight": (2, 1), "1.weight": (1, 2)}
    # 1.weight gets a shadow of the other shape
    save_file({"0.weight": shadow["0.weight"], "1.weight": shadow["0.weight"].clone()}, path)
    with pytest.raises(ValueError, match="EMA weights do not match.*other shapes \\['1.weight'\\]"):
        train(TwoWeights(), cfg, tmp_path / "run")
