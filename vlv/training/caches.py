"""What stage 1 keeps frozen, computed once into the keyed, sharded caches of :mod:`vlv.data.caches`: the VAE's
posteriors (``latents``) and the frozen vision tower's features (``vision``).

One operation, :func:`build_cache`, serves both ways a cache is made: ``vlv precompute`` (ahead of any number of
runs, :func:`vlv.training.stage1.precompute`) and a stage-1 run that caches into its own dir
(:func:`run_caches`). Ranks come from accelerate's process state: under ``accelerate launch`` / ``torchrun``
each writes its own shards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from accelerate import PartialState

from vlv.config import CACHE_BATCH_SIZE, CACHE_SHARD_ROWS
from vlv.data.caches import Cache, latents_key, latents_rows, vision_key, vision_rows, write_cache
from vlv.data.datasets import Dataset
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.training.config import Stage1Settings

Kind = Literal["latents", "vision"]
KINDS: tuple[Kind, ...] = ("latents", "vision")
RUN_DIRS: dict[str, str] = {"latents": "latents", "vision": "vision"}  # a run's own caches, inside its dir


def cache_key(kind: Kind, dataset: Dataset, size: int, decoder: DiffusionDecoder | None,
              encoder: VLVEncoder | None) -> dict:
    """What a cache of ``kind`` over ``dataset`` at ``size`` px is made from (model config, weights, data)."""
    return latents_key(decoder.vae, dataset, size) if kind == "latents" else vision_key(encoder, dataset, size)


def build_cache(kind: Kind, folder: str | Path, dataset: Dataset, size: int, state: PartialState,
                decoder: DiffusionDecoder | None = None, encoder: VLVEncoder | None = None,
                batch_size: int | None = None, shard_rows: int = CACHE_SHARD_ROWS, num_workers: int = 0,
                on_bad_image: Literal["skip", "fail"] = "skip",
                autocast: contextlib.AbstractContextManager | None = None, progress: bool = True) -> int:
    """Write this rank's missing shards of the ``kind`` cache (the VAE of ``decoder``, or ``encoder``'s frozen
    tower, on the device it sits on); returns the bad images met. A re-run finishes a killed one."""
    compute = latents_rows(decoder.vae) if kind == "latents" else vision_rows(encoder)
    with autocast or contextlib.nullcontext():
        return write_cache(folder, cache_key(kind, dataset, size, decoder, encoder), dataset, compute,
                           batch_size or CACHE_BATCH_SIZE[kind], shard_rows, rank=state.process_index,
                           world_size=state.num_processes, num_workers=num_workers, on_bad_image=on_bad_image,
                           progress=progress)


def run_caches(settings: Stage1Settings, decoder: DiffusionDecoder, encoder: VLVEncoder, dataset: Dataset, size: int,
               out: Path, accelerator, progress: bool = True) -> tuple[Cache | None, Cache | None]:
    """A stage-1 run's latents and vision caches: a given one (``--latents-cache`` / ``--vision-cache``) is only
    checked against this run's key, else it is built into the run dir (finished shards kept: a killed run goes on)."""
    given = {"latents": settings.latents_cache, "vision": settings.vision_cache}
    wanted = {"latents": settings.cache_latents, "vision": settings.cache_vision}
    caches: dict[str, Cache | None] = {}
    for kind in KINDS:
        if not (given[kind] or wanted[kind]):
            caches[kind] = None
            continue
        if kind == "vision":
            encoder.to(accelerator.device)
        folder = Path(given[kind]) if given[kind] else out / RUN_DIRS[kind]
        if not given[kind]:
            build_cache(kind, folder, dataset, size, accelerator, decoder, encoder, num_workers=settings.num_workers,
                        on_bad_image=settings.on_bad_image, progress=progress,
                        autocast=accelerator.autocast() if kind == "vision" else None)  # vision: a step's precision
            accelerator.wait_for_everyone()
        caches[kind] = Cache(folder, want=cache_key(kind, dataset, size, decoder, encoder))
    return caches["latents"], caches["vision"]
