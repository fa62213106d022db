"""A micro-step's random draws (noise, timesteps), per sample of the global batch, so N processes draw as one."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def step_seed(seed: int, step: int) -> int:
    """The generator seed of a micro-step; every rank uses it (each keeps its rows of the draws, see Draws)."""
    return (seed * 1_000_003 + step) * 1009


@dataclass(frozen=True)
class Draws:
    """A micro-step's random draws per sample, made for the whole global batch and sliced to this process's rows.

    Sample j of a step's global batch then gets the same t and noise whether one process holds the batch or N
    do (each rank holds rows rank*b .. rank*b + b - 1, as ``vlv.data.sampling.step_indices`` lays them out), so N
    processes train as one does. One process draws exactly what a plain generator would. It is the core's
    ``vlv.diffusion.RandomDraws``.
    """

    generator: torch.Generator | None = None
    rank: int = 0
    world_size: int = 1

    def _mine(self, full: torch.Tensor, b: int) -> torch.Tensor:
        return full if self.world_size == 1 else full[self.rank * b : (self.rank + 1) * b]

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
        b = shape[0]
        full = torch.randn((b * self.world_size, *shape[1:]), generator=self.generator, device=device, dtype=dtype)
        return self._mine(full, b)

    def randint(self, low: int, high: int, b: int, device: torch.device | str) -> torch.Tensor:
        full = torch.randint(low, high, (b * self.world_size,), generator=self.generator, device=device)
        return self._mine(full, b)

    def rand(self, b: int, device: torch.device | str) -> torch.Tensor:
        return self._mine(torch.rand(b * self.world_size, generator=self.generator, device=device), b)


def step_draws(seed: int, micro: int, rank: int, world_size: int, device: torch.device) -> Draws:
    """The draws of a micro-step on this rank: one seeded generator, shared by all ranks."""
    return Draws(torch.Generator(device=device).manual_seed(step_seed(seed, micro)), rank, world_size)
