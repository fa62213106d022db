"""What training keeps frozen, computed once into the keyed, sharded caches of :mod:`vlv.data.caches`: in stage 1
the VAE's posteriors (``latents``) and the frozen vision tower's features (``vision``); in stage 2, at the levels
that freeze the encoder, c = T(E(x)) (``text_embeds``).

One operation, :func:`build_cache`, serves every way a cache is made: ``vlv precompute`` (ahead of any number of
runs, :func:`vlv.training.stage1.precompute`) and a run that caches into its own dir (:func:`run_caches`,
:func:`run_text_embeds_cache`). Ranks come from accelerate's process state: under ``accelerate launch`` / ``torchrun``
each writes its own shards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState

from vlv.config import CACHE_BATCH_SIZE, CACHE_SHARD_ROWS
from vlv.data.caches import (
    Cache,
    Compute,
    latents_key,
    latents_rows,
    text_embeds_key,
    text_embeds_rows,
    vision_key,
    vision_rows,
    write_cache,
)
from vlv.data.datasets import Dataset
from vlv.data.images import Crop
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.training.config import Stage1Settings, Stage2Settings

Kind = Literal["latents", "vision", "text_embeds"]
KINDS: tuple[Kind, ...] = ("latents", "vision")  # stage 1's
RUN_DIRS: dict[str, str] = {"latents": "latents", "vision": "vision", "text_embeds": "text_embeds"}  # in a run dir


def cache_key(kind: Kind, dataset: Dataset, size: int | Crop, decoder: DiffusionDecoder | None,
              encoder: VLVEncoder | None, text_encoder: torch.nn.Module | None = None, precision: str = "no") -> dict:
    """What a cache of ``kind`` over ``dataset`` at ``size`` px (or cut by that crop) is made from (model config,
    weights, data; for ``text_embeds`` also the autocast ``precision`` it ran under)."""
    if kind == "latents":
        return latents_key(decoder.vae, dataset, size)
    if kind == "vision":
        return vision_key(encoder, dataset, size)
    return text_embeds_key(encoder, text_encoder, dataset, size, precision)


def _rows(kind: Kind, decoder: DiffusionDecoder | None, encoder: VLVEncoder | None,
          text_encoder: torch.nn.Module | None, batch_size: int) -> Compute:
    if kind == "latents":
        return latents_rows(decoder.vae)
    if kind == "vision":
        return vision_rows(encoder)
    return text_embeds_rows(encoder, text_encoder, batch_size)


def build_cache(kind: Kind, folder: str | Path, dataset: Dataset, size: int | Crop, state: PartialState,
                decoder: DiffusionDecoder | None = None, encoder: VLVEncoder | None = None,
                batch_size: int | None = None, shard_rows: int = CACHE_SHARD_ROWS, num_workers: int = 0,
                on_bad_image: Literal["skip", "fail"] = "skip",
                autocast: contextlib.AbstractContextManager | None = None, progress: bool = True,
                text_encoder: torch.nn.Module | None = None, precision: str = "no", key: dict | None = None) -> int:
    """Write this rank's missing shards of the ``kind`` cache (the VAE of ``decoder``, ``encoder``'s frozen
    tower, or ``encoder`` then ``text_encoder``, on the device they sit on); returns the bad images met. A re-run
    finishes a killed one. ``precision`` (text_embeds) names the ``autocast`` given, for the key; text_embeds are
    computed ``batch_size`` at a time, a short batch padded (give the step's, for the step's bits). ``key``: the
    :func:`cache_key` when the caller has it already (it hashes every weight and sample key, so it is made once)."""
    batch_size = batch_size or CACHE_BATCH_SIZE[kind]
    compute = _rows(kind, decoder, encoder, text_encoder, batch_size)
    key = key or cache_key(kind, dataset, size, decoder, encoder, text_encoder, precision)
    with autocast or contextlib.nullcontext():
        return write_cache(folder, key, dataset, compute, batch_size, shard_rows, rank=state.process_index,
                           world_size=state.num_processes, num_workers=num_workers, on_bad_image=on_bad_image,
                           progress=progress)


def run_caches(settings: Stage1Settings, decoder: DiffusionDecoder, encoder: VLVEncoder, dataset: Dataset,
               size: int | Crop, out: Path, accelerator, progress: bool = True) -> tuple[Cache | None, Cache | None]:
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
        key = cache_key(kind, dataset, size, decoder, encoder)
        if not given[kind]:
            build_cache(kind, folder, dataset, size, accelerator, decoder, encoder, num_workers=settings.num_workers,
                        on_bad_image=settings.on_bad_image, progress=progress, key=key,
                        autocast=accelerator.autocast() if kind == "vision" else None)  # vision: a step's precision
            accelerator.wait_for_everyone()
        caches[kind] = Cache(folder, want=key)
    return caches["latents"], caches["vision"]


def run_text_embeds_cache(settings: Stage2Settings, encoder: VLVEncoder, text_encoder: torch.nn.Module,
                          dataset: Dataset, size: int | Crop, out: Path, accelerator, precision: str, batch_size: int,
                          progress: bool = True) -> Cache:
    """A stage-2 run's c = T(E(x)) cache: a given one (``--text-embeds-cache``) is only checked against this run's
    key, else it is built into the run dir under the step's autocast and ``batch_size`` (the step's), so its rows
    are the bits a step computes (finished shards kept: a killed run goes on)."""
    given = settings.text_embeds_cache
    folder = Path(given) if given else out / RUN_DIRS["text_embeds"]
    if not given:
        encoder.to(accelerator.device)
        text_encoder.to(accelerator.device)
    key = cache_key("text_embeds", dataset, size, None, encoder, text_encoder, precision)
    if not given:
        build_cache("text_embeds", folder, dataset, size, accelerator, encoder=encoder, text_encoder=text_encoder,
                    batch_size=batch_size, num_workers=settings.num_workers, on_bad_image=settings.on_bad_image,
                    progress=progress, autocast=accelerator.autocast(), precision=precision, key=key)
        accelerator.wait_for_everyone()
    return Cache(folder, want=key)
