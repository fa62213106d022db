"""What the benchmarks share: step timing, peak memory, counted FLOPs."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


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
    alike (performance.md: ratios in one run, interleaved). Per variant: (seconds of its ``n`` steps after
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
