"""What the full-scale benchmarks (stage1_full.py, stage2_full.py) share: step timing and peak memory."""

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
