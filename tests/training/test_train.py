import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlv.training.config import TrainConfig
from vlv.training.loop import train
from vlv.training.recipes import section
from vlv.training.stop import PLAN_AFTER, plan_steps


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

    def loss(self, model, batch, draws):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    def evaluate(self, model):
        return {}


def test_plan_steps_fills_the_budget_and_never_goes_back():
    assert plan_steps(1.0, elapsed_s=0.0, seconds_per_step=0.5, min_steps=4) == 4 + 120
    assert plan_steps(1.0, elapsed_s=60.0, seconds_per_step=0.5, min_steps=7) == 7  # budget spent: stop here


class Clock:
    """The loop's clock, advanced by the task: a paced test that a loaded CI machine cannot slow down."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Paced(Regression):
    """The toy task paced like a CPU run: each step takes ``first`` seconds until PLAN_AFTER, then ``then``."""

    def __init__(self, clock: Clock, first: float, then: float):
        super().__init__()
        self.clock, self.first, self.then = clock, first, then

    def batch(self, step, rank, batch_size, device, world_size=1):
        self.clock.now += self.first if step < PLAN_AFTER else self.then
        return super().batch(step, rank, batch_size, device)


def test_steps_none_needs_a_budget():
    with pytest.raises(ValueError, match="needs budget_minutes"):
        TrainConfig(steps=None)
    assert TrainConfig(steps=None, budget_minutes=1.0).steps is None
    recipe = {"name": "r", "train": {"steps": 1500}}
    assert section(recipe, "train", TrainConfig, {"budget_minutes": 1.0}).steps is None  # a recipe's steps are moot
    assert section(recipe, "train", TrainConfig, {"budget_minutes": 1.0, "steps": 9}).steps == 9  # given: kept


def test_a_budgeted_run_keeps_replanning_so_it_fills_its_budget(tmp_path):
    # 20 ms steps plan ~120 steps for a 2.4 s budget; from step 20 on a step takes 5 ms, so the re-plans (every
    # REPLAN_EVERY steps, from the average pace) let the run use its budget instead of stopping at ~1 s.
    clock = Clock()
    cfg = TrainConfig(steps=None, batch_size=4, lr=1e-2, budget_minutes=0.04, warmup_steps=10, progress=False)
    state = train(Paced(clock, 0.02, 0.005), cfg, tmp_path / "run", clock=clock)
    assert state.done and state.step == state.planned_steps > 300
    assert 0.8 < state.elapsed_s / (60 * cfg.budget_minutes) < 1.2


def test_a_finished_budgeted_run_keeps_its_length_on_a_rerun(tmp_path):
    # 10 ms steps and a 0.6 s budget: planned at step 20 for 20 + 0.4 s / 10 ms steps.
    clock = Clock()
    cfg = TrainConfig(steps=None, batch_size=4, lr=1e-2, budget_minutes=0.01, warmup_steps=PLAN_AFTER,
                      progress=False)
    state = train(Paced(clock, 0.01, 0.01), cfg, tmp_path / "run", clock=clock)
    assert state.done and state.step == state.planned_steps and abs(state.step - (PLAN_AFTER + 40)) <= 1
    meta = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    assert meta["planned_steps"] == state.planned_steps == meta["config"]["steps"]
    # A re-run finds the plan in the checkpoint: nothing left to do, same length, no re-planning.
    again = train(Paced(clock, 0.01, 0.01), cfg, tmp_path / "run", clock=clock)
    assert again.done and again.step == state.planned_steps == again.planned_steps


def test_max_minutes_stops_this_invocation_with_a_checkpoint_and_a_rerun_finishes(tmp_path):
    # 1 s steps and a 0.1 minute limit: past 6 s after step 7, checked at every logged step.
    clock = Clock()
    cfg = TrainConfig(steps=10, batch_size=4, lr=1e-2, max_minutes=0.1, log_every=1, progress=False)
    state = train(Paced(clock, 1.0, 1.0), cfg, tmp_path / "run", clock=clock)
    assert not state.done and state.step == 7
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())["step"] == 7
    again = train(Paced(clock, 1.0, 1.0), cfg, tmp_path / "run", clock=clock)
    assert again.done and again.step == 10


def _torchrun(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    worker = Path(__file__).with_name("dist_worker.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _ranks(stdout: str) -> list[tuple[int, int, bool]]:
    rows = re.findall(r"rank (\d): step (\d+) planned (\d+) done (True|False)", stdout)
    return [(int(s), int(p), d == "True") for _, s, p, d in sorted(rows)]


@pytest.mark.dist
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


@pytest.mark.dist
def test_a_ddp_checkpoint_is_written_by_every_rank_and_resumes_exactly_on_two_processes_or_one(tmp_path):
    """DDP on 2 processes checkpoints through torch distributed checkpoint: both ranks write part of it (no rank
    waits for another to write it all), a run stopped halfway and resumed ends bit for bit as an uninterrupted one
    (weights, AdamW moments, EMA), the same checkpoint resumes on one process, write_once writes on rank 0 only and the
    process group waits as long as the config says."""
    from diffusers.training_utils import EMAModel

    from vlv.training.checkpoint import load_checkpoint

    worker = Path(__file__).with_name("ddp_checkpoint_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        full, resumed = (load_file(tmp_path / f"{name}.rank{rank}.safetensors") for name in ("full", "resumed"))
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    ckpt = tmp_path / "half" / "checkpoint"
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["layout"] == "dcp" and meta["step"] == 3 and not meta["sharded"]
    assert not (ckpt / "model.safetensors").exists()
    written = sorted(f.name for f in (ckpt / "shards").glob("*.distcp") if f.stat().st_size > 0)
    assert written == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote a share
    assert [f.name for f in tmp_path.glob("written.rank*")] == ["written.rank0"]
    assert {(tmp_path / f"timeout.rank{rank}").read_text() for rank in (0, 1)} == {"1:00:00"}  # TrainConfig's
    # One process (no process group) resumes it: weights, EMA and AdamW's step count.
    spec = importlib.util.spec_from_file_location("ddp_checkpoint_worker", worker)
    spec.loader.exec_module(toy := importlib.util.module_from_spec(spec))
    model = toy.Toy().model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ema = EMAModel(params, decay=0.9, use_ema_warmup=True, power=3 / 4)
    assert load_checkpoint(tmp_path / "half", model, opt, ema).step == 3
    ema.copy_to(params)
    half = load_file(tmp_path / "half.rank0.safetensors")
    assert all(torch.equal(v, half[k]) for k, v in model.state_dict().items())
    assert all(int(opt.state[p]["step"]) == 3 for p in params) and ema.optimization_step == 3


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


@pytest.mark.dist
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

    def loss(self, model, batch, draws):
        loss, count = super().loss(model, batch, draws)
        return (loss * float("nan") if self.step >= 24 else loss), count


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

    configs = sorted((Path(__file__).parents[2] / "launch").glob("*.yaml"))
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


def test_a_checkpoint_of_an_older_vlv_resumes_exactly(tmp_path):
    """An older vlv flattened the AdamW moments into optimizer.safetensors, their param groups in trainer.json."""
    from safetensors.torch import save_file

    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, progress=False)
    torch.manual_seed(0)
    full = TwoWeights()
    train(full, cfg, tmp_path / "full")
    torch.manual_seed(0)
    train(TwoWeights(), replace(cfg, stop_after=3), tmp_path / "parts")
    ckpt = tmp_path / "parts" / "checkpoint"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    save_file({f"{pid}.{k}": v for pid, st in saved["state"].items() for k, v in st.items()},
              ckpt / "optimizer.safetensors")
    meta = json.loads((ckpt / "trainer.json").read_text())
    (ckpt / "trainer.json").write_text(json.dumps({**meta, "optimizer": {"param_groups": saved["param_groups"]}}))
    (ckpt / "optimizer.pt").unlink()
    resumed = TwoWeights()  # another random init: the weights come from the checkpoint
    assert train(resumed, cfg, tmp_path / "parts").done
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
