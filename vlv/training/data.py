"""Where a task's batches come from: the images (and captions) of step k on rank r, and the bad samples met.

:class:`StepImages` serves any :mod:`vlv.data.datasets` dataset through :class:`vlv.data.loader.StepLoader`
(decoding in workers, prefetched), started at the first step the loop asks for and restarted whenever it asks for
another: a resumed run's loader simply starts at the resume step, and a batch depends only on its step, so resume
is exact. A dataset held in memory (:class:`vlv.data.datasets.InMemory`) takes the same path, in process: its
samples are decoded already, so workers would only copy them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from vlv.checks import read_json, require_data
from vlv.data.datasets import Dataset, InMemory, open_dataset, require_readable
from vlv.data.images import Crop
from vlv.data.loader import StepLoader
from vlv.errors import InvalidInput
from vlv.modeling import write_json

DATA_FILE = "data.json"
KEYS_SAVED = 10_000  # data.json lists at most this many bad samples' names (the count is always whole)


class BadSamples:
    """Bad samples per (step, rank): merging by step keeps the count exact when a resumed run re-reads steps."""

    def __init__(self) -> None:
        self.by_step: dict[str, list[str]] = {}

    def add(self, step: int, rank: int, names: list[str]) -> None:
        if names:
            self.by_step.setdefault(f"{step}/{rank}", []).extend(names)

    def save(self, run: Path, accelerator: Any = None, name: str = "") -> int:
        """Merge into run/data.json (atomically, on the main process), print a line; returns the run's count."""
        by_step = dict(self.by_step)
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            for part in gather_object([self.by_step]):
                by_step.update(part)
        if accelerator is not None and not accelerator.is_main_process:
            return 0
        path = Path(run) / DATA_FILE
        if path.exists():
            by_step = {**read_json(path).get("by_step", {}), **by_step}
        names = sorted({k for keys in by_step.values() for k in keys})
        count = sum(len(v) for v in by_step.values())
        write_json(path, {"bad_samples": count, "distinct": len(names), "names": names[:KEYS_SAVED],
                          "by_step": by_step})
        if count:
            print(f"[{name}] {count} bad sample(s) skipped ({len(names)} distinct, first {names[0]}); see {path}")
        return count


class StepImages:
    """A dataset's step batches from a StepLoader, (re)started at the step asked for: ``get`` gives ``images`` uint8
    (B', H, W, 3), ``captions`` and ``indices`` (B',) int64 of the samples kept."""

    def __init__(self, dataset: Dataset, size: int | Crop, seed: int, num_workers: int = 0,
                 on_bad_image: Literal["skip", "fail"] = "skip"):
        dataset.require_size(size)  # now, not at the first step
        if isinstance(dataset, InMemory):
            num_workers = 0  # decoded already: nothing for workers to do
        self.dataset, self.size, self.seed = dataset, size, seed
        self.num_workers, self.on_bad_image = num_workers, on_bad_image
        self.bad = BadSamples()
        self._it, self._next = None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, step: int, rank: int, world_size: int, batch_size: int) -> dict[str, Any]:
        if self._it is None or self._next != (step, rank, world_size, batch_size):
            self.close()
            self._it = iter(StepLoader(self.dataset, self.size, self.seed, batch_size, rank, world_size,
                                       start_step=step, num_workers=self.num_workers,
                                       on_bad_image=self.on_bad_image))
        batch = next(self._it)
        assert batch["step"] == step, (batch["step"], step)
        self._next = (step + 1, rank, world_size, batch_size)
        self.bad.add(step, rank, batch["bad_keys"])
        return batch

    def where(self, i: int) -> str:
        return self.dataset.where(i)

    def close(self) -> None:
        """Stop the workers (an iterator's workers end when it is dropped)."""
        self._it, self._next = None, None


def drop_bad_rows(idx: np.ndarray, ok: np.ndarray, source: StepImages, step: int, rank: int,
                  on_bad_image: str) -> np.ndarray:
    """Which of ``idx`` a cache holds (``ok``); the rest are bad samples (unreadable when the cache was made)."""
    if ok.all():
        return np.ones(len(idx), dtype=bool)
    names = [source.where(int(i)) for i in idx[~ok]]
    if on_bad_image == "fail":
        raise ValueError(f"bad image {names[0]}: it could not be read when the cache was made")
    source.bad.add(step, rank, names)
    return ok


def open_val(val: str | Path, image_column: str = "image", caption_column: str = "caption",
             captions: int = 0) -> Dataset:
    """Held-out data for ``--val`` (folder, tars or parquet), checked before a run loads anything: it exists, holds
    samples, some image reads (an unreadable one is skipped when read, as in training) and, given ``captions``,
    its first ``captions`` samples have one."""
    try:
        require_data(val)
        dataset = open_dataset(val, image_column, caption_column)
    except (FileNotFoundError, NotADirectoryError, InvalidInput) as e:  # each names the path
        raise InvalidInput(f"--val: {e}") from None
    if not len(dataset):
        raise InvalidInput(f"--val {val}: no samples")
    missing = next((i for i in range(min(captions, len(dataset))) if dataset.caption(i) is None), None)
    if missing is not None:
        raise InvalidInput(f"--val {val}: sample {dataset.where(missing)} has no caption; a held-out caption loss "
                           "needs image-caption data")
    require_readable(dataset, f"--val {val}")
    return dataset
