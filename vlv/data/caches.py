"""Precomputed caches of what is frozen, per sample: the VAE's posteriors and the frozen vision tower's features
(stage 1), and c = T(E(x)) of a frozen encoder and T (stage 2, ``text_embeds``).

A cache is a folder of safetensors shards, ``00000.safetensors``, ..., each holding ``shard_rows`` consecutive
samples of the dataset (the last one fewer), written atomically, so a killed precompute keeps its finished shards
and computes only the rest. Under ``accelerate launch`` / ``torchrun`` rank r writes shards r, r + W, ... and no
two ranks touch one file. Shards are read memory-mapped (:class:`Cache`): a batch reads only its own rows, so a
cache larger than RAM trains.

Each cache carries a key (``cache.json`` and every shard's metadata): what it is of (``kind``), a hash of the
model's config, a checksum of the weights that computed it, the data's fingerprint (sample count + a hash of the
keys), the resolution (and crop) and the dtype it is stored in. Training compares that key with the one its own
models and data give and refuses a cache that differs, naming the fields: a cache of other weights or other data never
trains silently. A row whose image could not be read is zeros with ``ok`` 0; training skips it as a bad sample.

A dataset held in memory (:class:`vlv.data.datasets.InMemory`, small data trained on whole) can cache its
posteriors in one file instead (:func:`posteriors_file`), keyed and refused the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlv.checks import read_json
from vlv.config import CACHE_SHARD_ROWS
from vlv.data.datasets import Dataset, InMemory
from vlv.data.images import Crop, as_crop, to_tensor
from vlv.data.loader import row_loader
from vlv.errors import InvalidInput
from vlv.modeling import atomic_save_file, write_json
from vlv.text_encoder import encode_embeds

CACHE_FILE = "cache.json"
CACHE_VERSION = 1
# What each cache stores its rows in (``vlv.training.plan`` sizes a cache from it before one is made).
CACHE_DTYPES = {"latents": "float16", "vision": "float16", "text_embeds": "float32"}
KEY_FIELDS = ("kind", "model", "weights", "data", "resolution", "crop", "dtype", "version")


# ----------------------------------------------------------------------------------------------------- keys
def tensors_checksum(modules: Iterable[torch.nn.Module]) -> str:
    """sha256 over the modules' parameters and buffers (names, dtypes, shapes, bytes): the weights a cache came from."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def config_hash(config: dict[str, Any]) -> str:
    """The model's fields only: diffusers' ``_``-keys are bookkeeping that differs between processes
    (``_use_default_values`` is a set's order) or places (``_name_or_path``)."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(dataset: Dataset) -> str:
    """``<count>:<hash of the keys in order>``: the same samples in the same order, wherever the files live."""
    keys = dataset.sample_keys()
    return f"{len(keys)}:{hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]}"


def decoded_at(resolution: int | Crop) -> dict[str, Any]:
    """How the images were cut: the side, and the crop when it is not vlv's square (so keys made before crops had
    kinds still match)."""
    crop = as_crop(resolution)
    return {"resolution": crop.size, **({"crop": crop.kind} if crop.kind != "vlv" else {})}


def key_crop(key: dict[str, Any]) -> Crop:
    """The crop a cache's images were cut by (what :func:`write_cache` decodes with)."""
    return Crop(key["resolution"], key.get("crop", "vlv"))


def latents_key(vae: torch.nn.Module, dataset: Dataset, resolution: int | Crop) -> dict[str, Any]:
    """Only what encoding touches: the VAE's config, and its encoder + quant_conv weights."""
    parts = [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]
    return {"kind": "latents", "model": config_hash(dict(vae.config)), "weights": tensors_checksum(parts),
            "data": data_fingerprint(dataset), **decoded_at(resolution), "dtype": CACHE_DTYPES["latents"],
            "version": CACHE_VERSION}


def vision_key(encoder: torch.nn.Module, dataset: Dataset, resolution: int | Crop) -> dict[str, Any]:
    """Only what ``image_features`` touches: the vision tower + projector, and the encoder's pixel pipeline."""
    model, config = encoder.florence.model, encoder.config
    described = {"vision": encoder.florence.config.vision_config.to_dict(), "image_size": config.image_size,
                 "image_mean": list(config.image_mean), "image_std": list(config.image_std)}
    return {"kind": "vision", "model": config_hash(described),
            "weights": tensors_checksum([model.vision_tower, model.multi_modal_projector]),
            "data": data_fingerprint(dataset), **decoded_at(resolution), "dtype": CACHE_DTYPES["vision"],
            "version": CACHE_VERSION}


def text_embeds_key(encoder: torch.nn.Module, text_encoder: torch.nn.Module, dataset: Dataset, resolution: int | Crop,
                    precision: str = "no") -> dict[str, Any]:
    """All of E and T (both frozen whole where this cache serves), the pixel pipeline and the step's autocast.

    Stored fp32: a row is then the very c a step computes, so the cached path trains the same weights.
    """
    config = encoder.config
    described = {"florence": _fields(encoder.florence.config.to_dict()), "image_size": config.image_size,
                 "image_mean": list(config.image_mean), "image_std": list(config.image_std),
                 "num_queries": config.num_queries, "prompt_ids": list(config.prompt_ids or []),
                 "text_encoder": _fields(text_encoder.config.to_dict()), "precision": precision}
    weights = tensors_checksum([encoder, text_encoder])
    return {"kind": "text_embeds", "model": config_hash(described), "weights": weights,
            "data": data_fingerprint(dataset), **decoded_at(resolution), "dtype": CACHE_DTYPES["text_embeds"],
            "version": CACHE_VERSION}


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers config's model fields: ``_name_or_path`` and the like say where it was read, not what it is."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def key_differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [k for k in KEY_FIELDS if have.get(k) != want.get(k)]


def _refuse(folder: Path, have: dict[str, Any], want: dict[str, Any], remedy: str = "precompute it again") -> None:
    diff = key_differences(have, want)
    if diff:
        detail = ", ".join(f"{k} {have.get(k)!r} != {want.get(k)!r}" for k in diff)
        raise InvalidInput(f"{folder}: this {want['kind']} cache was made from other inputs ({detail}); "
                           f"{remedy} for these")


# ---------------------------------------------------------------------------------------------------- write
def _shard_path(folder: Path, s: int) -> Path:
    return folder / f"{s:05d}.safetensors"


def _shard_key(path: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("vlv_cache", "null"))
    except Exception:  # a torn or foreign file: not a finished shard
        return None


Compute = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # uint8 images (B, H, W, 3) -> rows (B, ...)


def write_cache(folder: str | Path, key: dict[str, Any], dataset: Dataset, compute: Compute, batch_size: int,
                shard_rows: int = CACHE_SHARD_ROWS, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                on_bad_image: Literal["skip", "fail"] = "skip", progress: bool = True) -> int:
    """Write this rank's missing shards of ``compute`` over ``dataset`` (decoded as the key says, stored
    as ``key['dtype']``); returns the bad rows met. Finished shards (their key matching) are skipped, so a re-run
    resumes."""
    from vlv.progress import tqdm

    if shard_rows <= 0 or batch_size <= 0:
        raise ValueError(f"shard_rows and batch_size must be positive, got {shard_rows}, {batch_size}")
    folder = Path(folder)
    meta_path, n, dtype = folder / CACHE_FILE, len(dataset), getattr(torch, key["dtype"])
    if meta_path.exists():
        meta = read_json(meta_path, keys=("key",))
        _refuse(folder, meta["key"], key)
        if meta["shard_rows"] != shard_rows:
            raise InvalidInput(f"{folder} was started with {meta['shard_rows']} rows per shard, not {shard_rows}")
    n_shards = -(-n // shard_rows)
    missing = [s for s in range(n_shards) if _shard_key(_shard_path(folder, s)) != key]
    if missing:  # before anything is written: the size it will take, against the disk's free space
        rows_left = sum(min(n, (s + 1) * shard_rows) - s * shard_rows for s in missing)
        check_disk(folder, key["kind"], n, rows_left, row_nbytes(compute, key["resolution"], dtype), rank == 0)
    folder.mkdir(parents=True, exist_ok=True)
    if not meta_path.exists() and rank == 0:
        write_json(meta_path, {"key": key, "rows": n, "shard_rows": shard_rows})
    todo = [s for s in missing if s % world_size == rank]
    bad = 0
    for s in tqdm(todo, desc=f"caching {key['kind']}", unit="shard", disable=not progress):
        start, stop = s * shard_rows, min(n, (s + 1) * shard_rows)
        parts: dict[str, torch.Tensor] = {}
        ok = torch.zeros(stop - start, dtype=torch.uint8)
        for batch in row_loader(dataset, key_crop(key), start, stop, batch_size, num_workers, on_bad_image):
            bad += batch["bad"]
            if not len(batch["indices"]):
                continue
            rows = compute(batch["images"])  # name -> (B', ...)
            at = batch["indices"] - start
            for name, t in rows.items():
                if name not in parts:
                    parts[name] = torch.zeros((stop - start, *t.shape[1:]), dtype=dtype)
                parts[name][at] = t.to(dtype).cpu()
            ok[at] = 1
        tensors = {**{k: v.contiguous() for k, v in parts.items()}, "ok": ok}
        atomic_save_file(tensors, _shard_path(folder, s),
                         metadata={"vlv_cache": json.dumps(key), "start": str(start), "rows": str(stop - start)})
    return bad


def row_nbytes(compute: Compute, resolution: int, dtype: torch.dtype) -> int:
    """Bytes one sample takes in a shard: its rows, computed once on a blank image, stored as ``dtype``, and its
    ok flag (the exact shapes, whatever the model: latents, Nv visual tokens, Nq embeddings)."""
    rows = compute(torch.zeros(1, resolution, resolution, 3, dtype=torch.uint8))
    return sum(t[0].numel() for t in rows.values()) * dtype.itemsize + 1


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


# The flag that trains without a cache of each kind, for the refusal.
WITHOUT = {"latents": "--no-cache-latents", "vision": "--no-cache-vision", "text_embeds": "--no-cache-text-embeds"}


def check_disk(folder: Path, kind: str, rows: int, rows_left: int, row_bytes: int, announce: bool = True) -> None:
    """Print what a cache will take and the free disk (``announce``); refuse in one line when what is left to
    write does not fit (at 40M images a cache is terabytes: better said before the first shard than at the last)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free, total, left = shutil.disk_usage(probe).free, rows * row_bytes, rows_left * row_bytes
    if announce:
        print(f"[cache {kind}] {rows} samples x {_size(row_bytes)} = {_size(total)} on disk ({_size(left)} left to "
              f"write); {_size(free)} free at {probe}", flush=True)
    if left > free:
        raise InvalidInput(f"{folder}: the {kind} cache needs {_size(left)} more, the disk has {_size(free)} free: "
                           f"free space, write it to another disk, or train without it ({WITHOUT[kind]})")


def latents_rows(vae: torch.nn.Module) -> Compute:
    """Posterior (mean, std) per image, unscaled: each training step then draws its own ``mean + std * eps``,
    exactly as encoding online would, at none of the VAE's cost."""
    device = next(vae.parameters()).device

    def compute(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            dist = vae.encode(to_tensor(images.numpy()).to(device)).latent_dist
        return {"mean": dist.mean, "std": dist.std}  # (B, C, h, w) each

    return compute


def vision_rows(encoder: torch.nn.Module) -> Compute:
    """v' (B, Nv, D) of the frozen tower, in eval mode as in training (no drop-path); refuses what fp16 cannot hold."""
    if not encoder.vision_frozen:
        raise InvalidInput("this encoder's vision tower trains, so its features change every step: nothing to cache")
    device = next(encoder.parameters()).device

    def compute(images: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            v = encoder.image_features(encoder.transform.pixels(images, device))  # (B, Nv, D)
        encoder.train(was_training)
        if not torch.isfinite(v).all() or v.abs().max() > torch.finfo(torch.float16).max:
            raise InvalidInput("vision features do not fit fp16: they cannot be cached")
        return {"features": v}

    return compute


def text_embeds_rows(encoder: torch.nn.Module, text_encoder: torch.nn.Module, batch_size: int | None = None
                     ) -> Compute:
    """c = T(E(x)) (B, Nq, d_T), both in eval mode as a stage-2 step runs them frozen (no dropout).

    With ``batch_size`` (the step's) a shorter batch is padded to it: kernels may round differently at another
    batch shape, and at the step's shape a row is the very c the step would compute.
    """
    device = next(encoder.parameters()).device

    def compute(images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(images)
        if batch_size is not None and n < batch_size:
            images = torch.cat([images, images[-1:].expand(batch_size - n, *images.shape[1:])])  # (batch_size, ...)
        modes = encoder.training, text_encoder.training
        encoder.eval()
        text_encoder.eval()
        with torch.no_grad():
            z = encoder(encoder.transform.pixels(images, device))  # (B, Nq, d_T)
            c = encode_embeds(text_encoder, z)  # (B, Nq, d_T)
        encoder.train(modes[0])
        text_encoder.train(modes[1])
        return {"text_embeds": c[:n]}

    return compute


# ----------------------------------------------------------------------------------------------------- read
class Cache:
    """A finished cache, memory-mapped; ``cache[idx]`` is {name: (B, ...) in the key's dtype} and ``cache.ok``
    (N,) bool."""

    def __init__(self, folder: str | Path, want: dict[str, Any] | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / CACHE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no cache at {self.folder} (no {CACHE_FILE}); make one with vlv precompute")
        meta = read_json(meta_path, keys=("key",))
        self.key, self.rows, self.shard_rows = meta["key"], meta["rows"], meta["shard_rows"]
        if want is not None:
            _refuse(self.folder, self.key, want)
        paths = [_shard_path(self.folder, s) for s in range(-(-self.rows // self.shard_rows))]
        missing = [p.name for p in paths if _shard_key(p) != self.key]
        if missing:
            raise InvalidInput(f"{self.folder}: cache unfinished, {len(missing)} of {len(paths)} shards missing "
                               f"(first {missing[0]}); run the precompute again to finish it")
        self._files = [safe_open(str(p), framework="pt") for p in paths]
        self.names = [k for k in self._files[0].keys() if k != "ok"]
        self._slices = [{k: f.get_slice(k) for k in self.names} for f in self._files]
        self.ok = np.concatenate([f.get_tensor("ok").numpy() for f in self._files]).astype(bool)  # (N,)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        if not len(idx):
            raise ValueError("no rows asked of the cache")
        shard, local = idx // self.shard_rows, idx % self.shard_rows  # (B,) each
        return {k: torch.cat([self._slices[int(s)][k][int(r) : int(r) + 1] for s, r in zip(shard, local, strict=True)])
                for k in self.names}


def is_cache(folder: str | Path) -> bool:
    return (Path(folder) / CACHE_FILE).is_file()


# ------------------------------------------------------------------------------------------ one file, in memory
def posteriors(vae: torch.nn.Module, data: InMemory, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """:func:`latents_rows` over an in-memory dataset, in order: fp32 (mean, std), each (N, C, h, w)."""
    compute = latents_rows(vae)
    parts = []
    for idx in data.batches(batch_size):
        rows = compute(torch.from_numpy(data.images[idx]))
        parts.append({k: v.cpu() for k, v in rows.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in ("mean", "std")}


def posteriors_file(vae: torch.nn.Module, data: InMemory, path: str | Path, batch_size: int = 128
                    ) -> dict[str, torch.Tensor]:
    """:func:`posteriors` as fp16, computed once into ``path`` (atomically: a killed run recomputes it whole, never
    reads a torn file) under the key of :func:`latents_key`, then read back; a file of another VAE or other data
    is refused, naming what differs."""
    path, want = Path(path), latents_key(vae, data, data.size)
    if not path.exists():
        tensors = {k: v.half().contiguous() for k, v in posteriors(vae, data, batch_size).items()}
        atomic_save_file(tensors, path, metadata={"vlv_cache": json.dumps(want)})
    _refuse(path, _shard_key(path) or {}, want, remedy="delete it to compute it again")
    return load_file(path)
