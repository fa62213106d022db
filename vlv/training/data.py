"""Where a task's batches come from: the images (and captions) of step k on rank r, and the bad samples met.

:class:`StepImages` serves a :mod:`vlv.datasets` dataset through :class:`vlv.datasets.StepLoader` (decoding in
workers, prefetched), started at the first step the loop asks for and restarted whenever it asks for another:
a resumed run's loader simply starts at the resume step, and a batch depends only on its step, so resume is exact.
:class:`InRamImages` serves an in-memory :class:`vlv.data.ImageCaptionFolder` the same way (small data, the
benchmarks' RAM baseline). Both sample with :func:`vlv.datasets.step_indices`, so they give the same batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from vlv.data import ImageCaptionFolder
from vlv.datasets import Dataset, StepLoader, step_indices
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
            by_step = {**json.loads(path.read_text()).get("by_step", {}), **by_step}
        names = sorted({k for keys in by_step.values() for k in keys})
        count = sum(len(v) for v in by_step.values())
        write_json(path, {"bad_samples": count, "distinct": len(names), "names": names[:KEYS_SAVED],
                          "by_step": by_step})
        if count:
            print(f"[{name}] {count} bad sample(s) skipped ({len(names)} distinct, first {names[0]}); see {path}")
        return count


class ImageSource(Protocol):
    bad: BadSamples

    def __len__(self) -> int: ...

    def get(self, step: int, rank: int, world_size: int, batch_size: int) -> dict[str, Any]:
        """``images`` uint8 (B', H, W, 3), ``captions``, ``indices`` (B',) int64 of the samples kept."""

    def where(self, i: int) -> str:
        """Sample i's name, for errors and data.json."""

    def close(self) -> None: ...


class StepImages:
    """A dataset's step batches from a StepLoader, (re)started at the step asked for."""

    def __init__(self, dataset: Dataset, size: int, seed: int, num_workers: int = 0,
                 on_bad_image: Literal["skip", "fail"] = "skip"):
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


class InRamImages:
    """The same batches from an in-memory folder: ``data.images[step_indices(...)]``."""

    def __init__(self, data: ImageCaptionFolder, seed: int):
        self.data, self.seed, self.bad = data, seed, BadSamples()

    def __len__(self) -> int:
        return len(self.data)

    def get(self, step: int, rank: int, world_size: int, batch_size: int) -> dict[str, Any]:
        idx = step_indices(len(self.data), self.seed, step, rank, world_size, batch_size)
        return {"images": torch.from_numpy(self.data.images[idx]), "indices": torch.from_numpy(idx),
                "captions": [self.data.records[i].caption for i in idx.tolist()]}

    def where(self, i: int) -> str:
        return f"{self.data.records[i].image} ({self.data.folder})"

    def close(self) -> None:
        pass


def image_source(data: ImageCaptionFolder | Dataset, size: int, seed: int, num_workers: int = 0,
                 on_bad_image: Literal["skip", "fail"] = "skip") -> ImageSource:
    if isinstance(data, ImageCaptionFolder):
        if data.size != size:
            raise ValueError(f"the folder was loaded at {data.size} px, the task wants {size}")
        return InRamImages(data, seed)
    return StepImages(data, size, seed, num_workers, on_bad_image)


def drop_bad_rows(idx: np.ndarray, ok: np.ndarray, source: ImageSource, step: int, rank: int,
                  on_bad_image: str) -> np.ndarray:
    """Which of ``idx`` a cache holds (``ok``); the rest are bad samples (unreadable when the cache was made)."""
    if ok.all():
        return np.ones(len(idx), dtype=bool)
    names = [source.where(int(i)) for i in idx[~ok]]
    if on_bad_image == "fail":
        raise ValueError(f"bad image {names[0]}: it could not be read when the cache was made")
    source.bad.add(step, rank, names)
    return ok
