"""Batches read and decoded: a step's samples (:class:`StepLoader`, training) or rows in order (:func:`row_loader`,
cache precomputes), built in DataLoader workers; a bad sample is skipped and named, never replaced.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from vlv.data.datasets import Dataset, decode
from vlv.data.images import BAD_IMAGE_ERRORS, Crop, as_crop
from vlv.data.sampling import step_indices
from vlv.errors import BadImage


def load_batch(dataset: Dataset, indices: np.ndarray, size: int | Crop,
               on_bad_image: Literal["skip", "fail"] = "skip") -> dict[str, Any]:
    """Samples ``indices`` read and decoded (cut by the :class:`~vlv.data.images.Crop` given; a size: vlv's centre
    square): ``images`` uint8 (B', size, size, 3), ``captions``, ``keys``,
    ``indices`` (the B' kept), ``bad`` (how many were skipped) and ``bad_keys`` (what they were).

    A bad sample is skipped, never replaced (no black image); with on_bad_image="fail" the batch raises naming it.
    """
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
    images, captions, keys, kept, bad = [], [], [], [], []
    for i in np.asarray(indices).tolist():
        try:
            sample = dataset.read(i)
        except BAD_IMAGE_ERRORS as e:
            bad.append(_bad(dataset.where(i), e, on_bad_image))
            continue
        try:
            images.append(decode(sample.image, size))
        except BAD_IMAGE_ERRORS as e:
            bad.append(_bad(f"{sample.key} ({sample.source})", e, on_bad_image))
            continue
        captions.append(sample.caption)
        keys.append(sample.key)
        kept.append(i)
    side = as_crop(size).size
    stacked = np.stack(images) if images else np.zeros((0, side, side, 3), dtype=np.uint8)
    return {"images": torch.from_numpy(stacked), "captions": captions, "keys": keys,  # (B', H, W, 3) uint8
            "indices": torch.tensor(kept, dtype=torch.int64), "bad": len(bad), "bad_keys": bad}


def _bad(what: str, error: Exception, on_bad_image: str) -> str:
    if on_bad_image == "fail":
        raise BadImage(f"bad image {what}: {error} (--on-bad-image skip skips it)") from None
    return what


class StepBatches(torch.utils.data.Dataset):
    """Map-style: item k is the whole decoded batch of step k, so a DataLoader's workers build batches in parallel
    and any step can be asked for first (exact resume)."""

    def __init__(self, dataset: Dataset, size: int | Crop, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, on_bad_image: Literal["skip", "fail"] = "skip"):
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        if len(dataset) == 0:
            raise ValueError(f"no samples to load from {type(dataset).__name__}")
        dataset.require_size(size)  # here, not per sample: a refusal must not be counted as bad samples
        self.dataset, self.size, self.seed, self.batch_size = dataset, size, seed, batch_size
        self.rank, self.world_size, self.on_bad_image = rank, world_size, on_bad_image

    def __getitem__(self, step: int) -> dict[str, Any]:
        indices = step_indices(len(self.dataset), self.seed, step, self.rank, self.world_size, self.batch_size)
        return {**load_batch(self.dataset, indices, self.size, self.on_bad_image), "step": step}


class RowBatches(torch.utils.data.Dataset):
    """Map-style: item j is rows [start + j*batch, ...) decoded, in order: what a cache precompute reads."""

    def __init__(self, dataset: Dataset, size: int | Crop, start: int, stop: int, batch_size: int,
                 on_bad_image: Literal["skip", "fail"] = "skip"):
        dataset.require_size(size)
        self.dataset, self.size, self.start, self.stop = dataset, size, start, stop
        self.batch_size, self.on_bad_image = batch_size, on_bad_image

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __getitem__(self, j: int) -> dict[str, Any]:
        lo = self.start + j * self.batch_size
        rows = np.arange(lo, min(lo + self.batch_size, self.stop))
        return {**load_batch(self.dataset, rows, self.size, self.on_bad_image), "rows": torch.from_numpy(rows)}


class _Steps(torch.utils.data.Sampler):
    """start, start+1, ... (forever when steps is None)."""

    def __init__(self, start: int, steps: int | None):
        self.start, self.steps = start, steps

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while self.steps is None or step < self.start + self.steps:
            yield step
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless StepLoader has no length")
        return self.steps


def _one(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy follows it, so worker state is reproducible.
    np.random.seed(torch.initial_seed() % 2**32)
    # A scheduler's SIGTERM / a terminal's SIGINT reach the whole process group: the workers leave the stop to
    # the training process, which checkpoints and then shuts them down, instead of dying and crashing it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StepLoader(torch.utils.data.DataLoader):
    """Batches of steps ``start_step``, ``start_step + 1``, ... for one rank (endless unless ``steps``), each a dict:
    ``images`` uint8 (B', size, size, 3), ``captions``, ``keys``, ``indices`` int64 (B',), ``bad`` (samples
    skipped), ``step``. Identical for any ``num_workers``: a batch depends only on its step."""

    def __init__(self, dataset: Dataset, size: int | Crop, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, steps: int | None = None, num_workers: int = 0,
                 prefetch_factor: int = 2, on_bad_image: Literal["skip", "fail"] = "skip"):
        super().__init__(
            StepBatches(dataset, size, seed, batch_size, rank, world_size, on_bad_image),
            batch_size=None, sampler=_Steps(start_step, steps), collate_fn=_one, num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers > 0 else None, worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
        )


def row_loader(dataset: Dataset, size: int | Crop, start: int, stop: int, batch_size: int, num_workers: int = 0,
               on_bad_image: Literal["skip", "fail"] = "skip") -> torch.utils.data.DataLoader:
    """Rows [start, stop) in order, ``batch_size`` at a time, decoded in workers (see :class:`RowBatches`)."""
    return torch.utils.data.DataLoader(
        RowBatches(dataset, size, start, stop, batch_size, on_bad_image), batch_size=None, collate_fn=_one,
        num_workers=num_workers, prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
        worker_init_fn=_seed_worker)
