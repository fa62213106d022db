"""What the benchmarks share: shapes scene sets, recipes with overrides, results as JSON, step timing, peak memory
and counted FLOPs.

The scripts in ``benchmarks/`` import it as ``common`` (their folder is first on sys.path when run as scripts);
the probes in ``benchmarks/probes/`` put ``benchmarks/`` on the path first. vlv is imported inside the functions
that need it, so importing this module costs no more than torch.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vlv.data.datasets import InMemory
    from vlv.encoder import VLVEncoder


# ------------------------------------------------------------------------------------------- shapes data
def test_scenes(n: int, size: int, split: str = "test", seed: int = 0) -> InMemory:
    """``n`` scenes of a shapes split (the test split unless told), held in memory at ``size`` px.

    They are rendered into a temporary dir that is removed before this returns: the folder's images and
    captions are all in memory by then, so nothing is left behind on disk.
    """
    from vlv.data.datasets import InMemory
    from vlv.shapes.data import write_shapes

    with tempfile.TemporaryDirectory(prefix=f"vlv-{split}-") as tmp:
        return InMemory.of(write_shapes(Path(tmp) / split, n=n, seed=seed, split=split, progress=False), size)


# ----------------------------------------------------------------------------------------------- recipes
def given(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Override layers merged left to right, a None value never replacing one below it (a flag not given)."""
    out: dict[str, Any] = {}
    for layer in layers:
        out.update({k: v for k, v in (layer or {}).items() if v is not None})
    return out


def stage1_settings(recipe: dict[str, Any], overrides: dict[str, Any] | None = None, decoder: str = "",
                    data: str = ""):
    """A stage-1 recipe's ``settings`` section as Stage1Settings, ``overrides`` (None: the recipe's) on top."""
    from vlv.training.config import Stage1Settings
    from vlv.training.recipes import section

    return section(recipe, "settings", Stage1Settings, given(overrides), decoder=decoder, data=data)


def train_config(recipe: dict[str, Any], *overrides: dict[str, Any] | None):
    """A recipe's ``train`` section as TrainConfig, each override layer (None: not given) on top of the last."""
    from vlv.training.config import TrainConfig
    from vlv.training.recipes import section

    return section(recipe, "train", TrainConfig, given(*overrides))


def fresh_encoder(text_dim: int, num_queries: int | None = None, seed: int = 0,
                  recipe: str = "shapes") -> VLVEncoder:
    """An untrained stage-1 encoder as a run of ``recipe`` starts from (its encoder config, trainable set and
    init settings), with ``num_queries`` queries (None: the recipe's)."""
    from vlv.training.recipes import load_recipe
    from vlv.training.stage1 import build_encoder

    settings = stage1_settings(load_recipe(recipe, "stage1"), {"num_queries": num_queries})
    return build_encoder(settings, text_dim, seed=seed)


def adamw(params: Iterable[torch.nn.Parameter], cfg) -> torch.optim.AdamW:
    """AdamW over ``params`` with a TrainConfig's lr, betas and weight decay, as the training loop builds it."""
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------- results
def write_result(path: Path | None, result: dict) -> None:
    """A benchmark's results as JSON at ``path`` (its folder made); nothing when no path was given."""
    if path is None:
        return
    from vlv.modeling import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)


# ------------------------------------------------------------------------------------------------ timing
def peak_memory_gib(device: str | torch.device) -> float:
    """Peak allocated GPU memory on cuda, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_steps(step: Callable[[int], None], steps: int, device: str | torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step(i)`` after one warm-up call, the GPU synchronised around each."""
    cuda, times = torch.device(device).type == "cuda", []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return times


def interleaved_times(steps: dict[str, Callable[[int], None]], n: int, device: str | torch.device
                      ) -> dict[str, tuple[list[float], float] | None]:
    """A/B/... timing: round i runs one step of every variant in turn, so drift on a shared machine hits all
    alike (docs/performance.md: ratios in one run, interleaved). Per variant: (seconds of its ``n`` steps after
    one warm-up, peak memory in GiB), or None once it ran out of memory (the others go on)."""
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks: dict[str, float] = dict.fromkeys(steps, 0.0)
    failed: set[str] = set()
    for i in range(n + 1):
        for name, step in steps.items():
            if name in failed:
                continue
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            try:
                step(i)
                if cuda:
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                failed.add(name)
            if name in failed:  # outside the except block, so the failed step's activations can be freed
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if i:
                times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks[name], peak_memory_gib(device))
    return {k: None if k in failed else (times[k], peaks[k]) for k in steps}


def flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn``, counted by torch.utils.flop_counter (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
