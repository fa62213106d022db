"""Which samples step k of rank r reads: a pure function of (seed, step, rank, world size, batch size).

A keyed permutation per epoch, cut into consecutive per-rank batches. Nothing needs saving to resume exactly, an
epoch visits every sample once, and no step reads a sample twice (ranks never overlap, also across an epoch's end,
given at least two steps' worth of samples).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _straddle(n: int, epoch: int, group: int) -> int:
    """How many of epoch ``epoch - 1``'s last samples share a step with the start of ``epoch`` (0: none)."""
    return epoch * n - (epoch * n // group) * group


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int, group: int) -> np.ndarray:
    """Epoch ``epoch``'s sample order: the permutation keyed by (seed, epoch), with the samples of its first step
    that the previous epoch's last step also reads swapped further in, so one step never reads a sample twice.

    The swaps stay clear of the epoch's own last step (possible when n >= 2 * group), so the previous epoch's tail
    is its plain keyed permutation's: no chain back to epoch 0.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    t = _straddle(n, epoch, group) if epoch > 0 and n >= 2 * group else 0
    if t:
        head = group - t
        tail = np.random.default_rng([seed, epoch - 1]).permutation(n)[n - t :]
        clash = np.flatnonzero(np.isin(order[:head], tail))
        end = n - _straddle(n, epoch + 1, group)
        free = head + np.flatnonzero(~np.isin(order[head:end], tail))[: len(clash)]
        order[clash], order[free] = order[free], order[clash].copy()
    order.flags.writeable = False  # shared by every caller through the cache
    return order


def step_indices(n: int, seed: int, step: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """The sample indices of ``step`` on ``rank``: positions (step*world_size + rank)*batch_size + [0, batch) of
    the sample stream, epoch e being n positions in a permutation keyed by (seed, e). Pure, so resuming needs only
    the step; an epoch reads every sample once, and a step no sample twice (given n >= 2*world_size*batch_size)."""
    if n <= 0 or batch_size <= 0 or not 0 <= rank < world_size or step < 0:
        raise ValueError(f"bad sampling arguments: n={n} step={step} rank={rank}/{world_size} batch={batch_size}")
    pos = (step * world_size + rank) * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = pos // n
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):  # one epoch per batch, two at a boundary (more only when batch > n)
        sel = epochs == e
        out[sel] = _epoch_order(n, seed, int(e), world_size * batch_size)[pos[sel] % n]
    return out
