"""Image-caption data at the paper's scale: one random-access interface over folders, tar shards and parquet.

Every format answers ``len(ds)`` and ``ds.read(i) -> Sample`` without holding its images: a folder keeps only its
records, tar shards a per-shard index of member offsets, parquet one or two row groups. Decoding and the centre
square crop + bicubic resize (:func:`vlv.data.load_image`'s, so pixels equal the in-RAM folder's) run in
:func:`decode`, inside the DataLoader workers.

Which samples a step reads is a pure function of (seed, step, rank, world size, batch size) (:func:`step_indices`):
a keyed permutation per epoch, cut into consecutive per-rank batches. Nothing needs saving to resume exactly, an
epoch visits every sample once, and no step reads a sample twice (ranks never overlap, also across an epoch's end,
given at least two steps' worth of samples). :class:`StepLoader` serves those batches from workers.

Tar shards (webdataset / img2dataset layout) are indexed by vlv itself, once per shard, into ``<shard>.idx.json``:
webdataset's own library only streams (no random access, resume left to the user), and ``wids`` copies shards
into a cache; its idea (an index of member offsets, then plain seek + read) is what :class:`TarShards` mimics,
without the dependency.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import tarfile
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlv.data import BAD_IMAGE_ERRORS, CAPTIONS, IMAGE_EXTENSIONS, _square, open_image, read_records
from vlv.errors import BadImage, InvalidInput

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 1


@dataclass
class Sample:
    """One image-caption pair as stored: ``image`` still encoded (bytes) where the format keeps it so."""

    key: str
    image: Image.Image | bytes
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields (a folder's "scene", a tar's json)
    source: str = ""  # the file it came from, for error messages


def decode(image: Image.Image | bytes, size: int) -> np.ndarray:
    """Encoded bytes or a PIL image -> RGB uint8 (size, size, 3), exactly as :func:`vlv.data.load_image`."""
    return _square(open_image(image), size)


class Dataset(ABC):
    """Random access to image-caption samples, holding none of the images."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, i: int) -> Sample:
        """Sample ``i`` (0 <= i < len); raises OSError when its image cannot be read."""

    @abstractmethod
    def where(self, i: int) -> str:
        """Sample ``i``'s key and file, without reading it: what an error names."""

    def sample_keys(self) -> list[str]:
        """Every sample's key in order, without decoding: what a cache's data fingerprint hashes."""
        return [self.read(i).key for i in range(len(self))]

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return int(i)


# ------------------------------------------------------------------------------------------------- folders
class FolderDataset(Dataset):
    """An image-caption folder (``captions.jsonl`` + images), read lazily: only the records stay in memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.records = read_records(self.folder)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> Sample:
        r = self.records[self._check(i)]
        path = self.folder / r.image
        meta = {"scene": r.scene} if r.scene is not None else {}
        return Sample(_folder_key(r.image), path.read_bytes(), r.caption, meta, str(path))

    def where(self, i: int) -> str:
        r = self.records[self._check(i)]
        return f"{_folder_key(r.image)} ({self.folder / r.image})"

    def sample_keys(self) -> list[str]:
        return [_folder_key(r.image) for r in self.records]


def _folder_key(image: str) -> str:
    return Path(image).with_suffix("").as_posix()


# ----------------------------------------------------------------------------------------------- tar shards
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's rule: key = path up to the basename's first dot


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + INDEX_SUFFIX)


def build_index(shard: Path) -> dict[str, Any]:
    """Walk a tar once with ``tarfile``: per sample its key and the (offset, size) of its image, txt and json."""
    st = shard.stat()
    samples: dict[str, dict[str, Any]] = {}
    complete = True
    with tarfile.open(shard, "r:") as tf:
        members = iter(tf)
        while True:
            try:
                m = next(members)
            except StopIteration:
                break
            except tarfile.ReadError:  # cut short (an interrupted download): keep the members before the cut
                complete = False
                break
            if m.isfile() and m.offset_data + m.size > st.st_size:
                complete = False
                break
            match = _MEMBER.match(m.name) if m.isfile() else None
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            s = samples.setdefault(key, {})
            if ext in TAR_IMAGE_EXTENSIONS and "image" not in s:
                s["image"], s["ext"] = [m.offset_data, m.size], ext
            elif ext in ("txt", "json"):
                s[ext] = [m.offset_data, m.size]
    keys = [k for k, s in samples.items() if "image" in s]  # a key without an image is no sample
    return {"version": INDEX_VERSION, "shard_bytes": st.st_size, "shard_mtime_ns": st.st_mtime_ns,
            "truncated": not complete,
            "keys": keys, "ext": [samples[k]["ext"] for k in keys], "image": [samples[k]["image"] for k in keys],
            "txt": [samples[k].get("txt") for k in keys], "json": [samples[k].get("json") for k in keys]}


def load_index(shard: Path) -> dict[str, Any]:
    """The shard's saved index when it matches the shard's size and mtime; else built and saved (atomically)."""
    path = index_path(shard)
    st = shard.stat()
    if path.exists():
        try:
            index = json.loads(path.read_text())
            if (index.get("version") == INDEX_VERSION and index.get("shard_bytes") == st.st_size
                    and index.get("shard_mtime_ns") == st.st_mtime_ns):
                return _warn_truncated(shard, index)
        except (json.JSONDecodeError, OSError):
            pass  # torn or unreadable: rebuild
    try:
        index = build_index(shard)
    except tarfile.TarError as e:
        raise InvalidInput(f"{shard}: not a readable tar ({e})") from None
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks indexing at once never collide
    try:
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
    except OSError as e:  # a read-only dataset: use the index without saving it
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot save the index of {shard} ({e.strerror or e}); rebuilt on every open", stacklevel=2)
    return _warn_truncated(shard, index)


def _warn_truncated(shard: Path, index: dict[str, Any]) -> dict[str, Any]:
    if index.get("truncated"):
        warnings.warn(f"{shard} is truncated: only its {len(index['keys'])} samples before the cut are read",
                      stacklevel=3)
    return index


def _pairs(rows: list[list[int] | None]) -> np.ndarray:
    """[[offset, size] | None, ...] -> int64 (n, 2), -1 where absent."""
    out = np.full((len(rows), 2), -1, dtype=np.int64)
    have = [j for j, r in enumerate(rows) if r is not None]
    if have:
        out[have] = [rows[j] for j in have]
    return out


class TarShards(Dataset):
    """webdataset / img2dataset tar shards (``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` and/or ``KEY.json``).

    The indexes live in numpy arrays (no per-sample Python objects), so forked workers share them; a read is a
    seek + read of one member. The caption is ``KEY.txt`` (whitespace-trimmed), else the json's ``"caption"``.
    """

    def __init__(self, shards: Sequence[str | Path]):
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise ValueError("no tar shards given")
        for s in self.shards:
            if not s.is_file():
                raise FileNotFoundError(f"no such tar shard: {s}")
        keys, ext, image, txt, meta, counts = [], [], [], [], [], []
        for s in self.shards:
            index = load_index(s)
            keys += index["keys"]
            ext += [TAR_IMAGE_EXTENSIONS.index(e) for e in index["ext"]]
            image.append(_pairs(index["image"]))
            txt.append(_pairs(index["txt"]))
            meta.append(_pairs(index["json"]))
            counts.append(len(index["keys"]))
        self.keys = np.array(keys, dtype=str)
        self.ext = np.array(ext, dtype=np.uint8)
        self.image, self.txt, self.json = (np.concatenate(a) for a in (image, txt, meta))  # (N, 2) each
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # sample range of shard s: starts[s]:starts[s+1]

    def __len__(self) -> int:
        return len(self.keys)

    def _shard(self, i: int) -> Path:
        return self.shards[int(np.searchsorted(self.starts, i, side="right")) - 1]

    def _bytes(self, shard: Path, span: np.ndarray) -> bytes:
        with shard.open("rb") as f:
            f.seek(int(span[0]))
            data = f.read(int(span[1]))
        if len(data) != span[1]:
            raise OSError(f"{shard} is truncated (member at {span[0]} wants {span[1]} bytes)")
        return data

    def read(self, i: int) -> Sample:
        i = self._check(i)
        shard = self._shard(i)
        caption, meta = None, {}
        if self.json[i, 0] >= 0:
            meta = json.loads(self._bytes(shard, self.json[i]))
            meta = meta if isinstance(meta, dict) else {"json": meta}
            caption = meta.pop("caption", None)
            meta.pop("key", None)
        if self.txt[i, 0] >= 0:
            caption = self._bytes(shard, self.txt[i]).decode("utf-8").strip()
        return Sample(str(self.keys[i]), self._bytes(shard, self.image[i]), caption, meta, str(shard))

    def where(self, i: int) -> str:
        i = self._check(i)
        return f"{self.keys[i]} ({self._shard(i)})"

    def sample_keys(self) -> list[str]:
        return self.keys.tolist()


def expand_braces(pattern: str) -> list[str]:
    """``data/{00000..00009}.tar`` / ``{a,b}.tar`` -> the names, as webdataset's brace patterns (zero padding kept)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(hi) < int(lo):
            raise InvalidInput(f"empty range {{{body}}} in {pattern}")
        width = len(lo) if lo.startswith("0") else 0
        parts = [f"{k:0{width}d}" for k in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [name for p in parts for name in expand_braces(head + p + tail)]


# -------------------------------------------------------------------------------------------------- parquet
class ParquetDataset(Dataset):
    """Parquet files with an image and a caption column (HF datasets, img2dataset's parquet, the paper's release).

    The image is encoded bytes (a binary column, or a struct with a ``bytes`` field as HF datasets write it), or a
    raw uint8 HxWx3 buffer whose height and width are in columns (told apart by length: h*w*3 bytes and no image
    signature). A read loads the row group holding the sample (memory-mapped, at most ``cached_row_groups`` kept per
    process), so random access costs a row group per sample: small row groups, or tar shards (``vlv data shards``),
    read faster. The key is the ``key`` column when there is one, else ``<file stem>_<row>``.
    """

    def __init__(self, files: Sequence[str | Path], image_column: str = "image", caption_column: str = "caption",
                 height_column: str = "height", width_column: str = "width", key_column: str = "key",
                 cached_row_groups: int = 2):
        import pyarrow.parquet as pq

        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("no parquet files given")
        self.image_column, self.cached_row_groups = image_column, cached_row_groups
        rg_file, rg_group, rg_rows = [], [], []
        columns: list[str] = []
        for k, path in enumerate(self.files):
            if not path.is_file():
                raise FileNotFoundError(f"no such parquet file: {path}")
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
                raise InvalidInput(f"{path}: not a readable parquet file ({e})") from None
            names = meta.schema.to_arrow_schema().names
            if image_column not in names:
                raise InvalidInput(f"{path} has no image column {image_column!r} (columns: {', '.join(names)})")
            columns = columns or names
            rg_file += [k] * meta.num_row_groups
            rg_group += list(range(meta.num_row_groups))
            rg_rows += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.caption_column = caption_column if caption_column in columns else None
        self.key_column = key_column if key_column in columns else None
        self.size_columns = ((height_column, width_column) if height_column in columns and width_column in columns
                             else None)
        self.rg_file = np.array(rg_file, dtype=np.int64)
        self.rg_group = np.array(rg_group, dtype=np.int64)
        self.rg_starts = np.concatenate([[0], np.cumsum(rg_rows, dtype=np.int64)])  # global row of each group
        file_rows = np.bincount(self.rg_file, weights=rg_rows, minlength=len(self.files)).astype(np.int64)
        self.file_starts = np.concatenate([[0], np.cumsum(file_rows)])
        self._open: dict[int, Any] = {}
        self._cache: OrderedDict[int, Any] = OrderedDict()  # row group -> pyarrow Table

    def __getstate__(self) -> dict[str, Any]:
        # Open files and cached row groups stay in their process; a worker opens its own.
        return {**self.__dict__, "_open": {}, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return int(self.rg_starts[-1])

    def _locate(self, i: int) -> tuple[int, int, int]:
        """(row group, row in it, row in its file) of global row i."""
        g = int(np.searchsorted(self.rg_starts, i, side="right")) - 1
        return g, i - int(self.rg_starts[g]), i - int(self.file_starts[self.rg_file[g]])

    def _row_group(self, g: int):
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        import pyarrow.parquet as pq

        k = int(self.rg_file[g])
        if k not in self._open:
            self._open[k] = pq.ParquetFile(self.files[k], memory_map=True)
        columns = [c for c in (self.image_column, self.caption_column, self.key_column, *(self.size_columns or ()))
                   if c]
        self._cache[g] = table = self._open[k].read_row_group(int(self.rg_group[g]), columns=columns)
        while len(self._cache) > self.cached_row_groups:
            self._cache.popitem(last=False)
        return table

    def read(self, i: int) -> Sample:
        g, j, row = self._locate(self._check(i))
        table = self._row_group(g)
        path = self.files[int(self.rg_file[g])]

        def value(column: str) -> Any:
            return table.column(column)[j].as_py()

        data = value(self.image_column)
        if isinstance(data, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        if not isinstance(data, bytes):
            raise OSError(f"row {row} of {path} holds no image bytes")
        image: Image.Image | bytes = data
        if self.size_columns is not None:
            h, w = (value(c) for c in self.size_columns)
            if h and w and len(data) == h * w * 3 and _encoded_format(data) is None:
                image = Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3))
        key = str(value(self.key_column)) if self.key_column else f"{path.stem}_{row}"
        caption = value(self.caption_column) if self.caption_column else None
        return Sample(key, image, caption, {}, str(path))

    def where(self, i: int) -> str:
        g, _, row = self._locate(self._check(i))
        return f"row {row} ({self.files[int(self.rg_file[g])]})"

    def sample_keys(self) -> list[str]:
        """The key column read alone (or ``<file stem>_<row>``): no image bytes are touched."""
        import pyarrow.parquet as pq

        keys: list[str] = []
        for k, path in enumerate(self.files):
            rows = int(self.file_starts[k + 1] - self.file_starts[k])
            if self.key_column:
                keys += [str(v) for v in pq.read_table(path, columns=[self.key_column]).column(0).to_pylist()]
            else:
                keys += [f"{path.stem}_{row}" for row in range(rows)]
        return keys


# ----------------------------------------------------------------------------------------------- open_dataset
def open_dataset(path: str | Path, image_column: str = "image", caption_column: str = "caption",
                 height_column: str = "height", width_column: str = "width") -> Dataset:
    """The dataset at ``path``: an image-caption folder, tar shards (a dir of ``*.tar``, one ``.tar``, or a brace
    pattern ``data/{00000..00009}.tar``) or parquet (a ``.parquet`` file or a dir of them)."""
    text = str(path)

    def parquet(files: Sequence[Path]) -> ParquetDataset:
        return ParquetDataset(files, image_column, caption_column, height_column, width_column)

    if "{" in text:
        names = [Path(n) for n in expand_braces(text)]
        missing = [n for n in names if not n.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(names)} files of {text} missing, first {missing[0]}")
        suffixes = {n.suffix.lower() for n in names}
        if suffixes == {".tar"}:
            return TarShards(names)
        if suffixes == {".parquet"}:
            return parquet(names)
        raise InvalidInput(f"{text}: a pattern must name only .tar or only .parquet files")
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return TarShards([p])
        if p.suffix.lower() == ".parquet":
            return parquet([p])
        raise InvalidInput(f"{p}: not a dataset (want a folder, .tar shards or .parquet files)")
    if not p.is_dir():
        raise FileNotFoundError(f"no such dataset: {p}")
    if (p / CAPTIONS).exists():
        return FolderDataset(p)
    # Tars before parquet: img2dataset writes a sidecar NNNNN.parquet (no images) next to each NNNNN.tar.
    if tars := sorted(p.glob("*.tar")):
        return TarShards(tars)
    if parquets := sorted(p.glob("*.parquet")):
        return parquet(parquets)
    if any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir()):
        return FolderDataset(p)
    raise InvalidInput(f"{p}: no {CAPTIONS}, images, .tar shards or .parquet files")


# ------------------------------------------------------------------------------------------------- sampling
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


# --------------------------------------------------------------------------------------------------- loader
def load_batch(dataset: Dataset, indices: np.ndarray, size: int,
               on_bad_image: Literal["skip", "fail"] = "skip") -> dict[str, Any]:
    """Samples ``indices`` read and decoded: ``images`` uint8 (B', size, size, 3), ``captions``, ``keys``,
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
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return {"images": torch.from_numpy(stacked), "captions": captions, "keys": keys,  # (B', H, W, 3) uint8
            "indices": torch.tensor(kept, dtype=torch.int64), "bad": len(bad), "bad_keys": bad}


def _bad(what: str, error: Exception, on_bad_image: str) -> str:
    if on_bad_image == "fail":
        raise BadImage(f"bad image {what}: {error} (--on-bad-image skip skips it)") from None
    return what


class StepBatches(torch.utils.data.Dataset):
    """Map-style: item k is the whole decoded batch of step k, so a DataLoader's workers build batches in parallel
    and any step can be asked for first (exact resume)."""

    def __init__(self, dataset: Dataset, size: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 on_bad_image: Literal["skip", "fail"] = "skip"):
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        if len(dataset) == 0:
            raise ValueError(f"no samples to load from {type(dataset).__name__}")
        self.dataset, self.size, self.seed, self.batch_size = dataset, size, seed, batch_size
        self.rank, self.world_size, self.on_bad_image = rank, world_size, on_bad_image

    def __getitem__(self, step: int) -> dict[str, Any]:
        indices = step_indices(len(self.dataset), self.seed, step, self.rank, self.world_size, self.batch_size)
        return {**load_batch(self.dataset, indices, self.size, self.on_bad_image), "step": step}


class RowBatches(torch.utils.data.Dataset):
    """Map-style: item j is rows [start + j*batch, ...) decoded, in order: what a cache precompute reads."""

    def __init__(self, dataset: Dataset, size: int, start: int, stop: int, batch_size: int,
                 on_bad_image: Literal["skip", "fail"] = "skip"):
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

    def __init__(self, dataset: Dataset, size: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, steps: int | None = None, num_workers: int = 0, prefetch_factor: int = 2,
                 on_bad_image: Literal["skip", "fail"] = "skip"):
        super().__init__(
            StepBatches(dataset, size, seed, batch_size, rank, world_size, on_bad_image),
            batch_size=None, sampler=_Steps(start_step, steps), collate_fn=_one, num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers > 0 else None, worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
        )


def row_loader(dataset: Dataset, size: int, start: int, stop: int, batch_size: int, num_workers: int = 0,
               on_bad_image: Literal["skip", "fail"] = "skip") -> torch.utils.data.DataLoader:
    """Rows [start, stop) in order, ``batch_size`` at a time, decoded in workers (see :class:`RowBatches`)."""
    return torch.utils.data.DataLoader(
        RowBatches(dataset, size, start, stop, batch_size, on_bad_image), batch_size=None, collate_fn=_one,
        num_workers=num_workers, prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
        worker_init_fn=_seed_worker)

# ---------------------------------------------------------------------------------------------- write_shards
def _encoded_format(data: bytes) -> str | None:
    """The tar extension of encoded image bytes that are kept as they are (png, jpg, webp), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _image_member(image: Image.Image | bytes) -> tuple[str, bytes]:
    """(extension, bytes): the original encoding where tars keep it, else lossless PNG."""
    if isinstance(image, bytes):
        if fmt := _encoded_format(image):
            return fmt, image
        with Image.open(io.BytesIO(image)) as im:
            return _image_member(im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L") else im.copy())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: the same source gives the same bytes
    tf.addfile(info, io.BytesIO(data))


def write_shards(src: Dataset, out_dir: str | Path, shard_size: int = 10_000, progress: bool = False) -> list[Path]:
    """``src`` as webdataset tar shards ``00000.tar``, ... in ``out_dir``: ``KEY.png|jpg|webp`` (original bytes where
    possible), ``KEY.txt`` (caption), ``KEY.json`` (key + extra fields), each shard written to a temp file then
    renamed, and indexed."""
    if shard_size <= 0:
        raise InvalidInput(f"shard size must be positive, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):  # stale shards would join the new ones when the dir is opened
        raise FileExistsError(f"{out} already holds .tar shards")
    n_shards = -(-len(src) // shard_size)
    width = max(5, len(str(n_shards - 1)))
    seen: set[str] = set()
    shards = []
    bar = tqdm(total=len(src), desc="writing shards", unit="img", disable=not progress)
    for s in range(n_shards):
        shard = out / f"{s:0{width}d}.tar"
        tmp = shard.with_name(shard.name + ".tmp")
        with tarfile.open(tmp, "w") as tf:
            for i in range(s * shard_size, min(len(src), (s + 1) * shard_size)):
                sample = src.read(i)
                key = sample.key.replace(".", "_")  # a dot would end the key (webdataset's rule)
                if key in seen:
                    raise InvalidInput(f"duplicate sample key {key!r} ({sample.source})")
                seen.add(key)
                ext, data = _image_member(sample.image)
                _add(tf, f"{key}.{ext}", data)
                if sample.caption is not None:
                    _add(tf, f"{key}.txt", sample.caption.encode("utf-8"))
                _add(tf, f"{key}.json", json.dumps({"key": key, **sample.meta}).encode("utf-8"))
                bar.update()
        os.replace(tmp, shard)
        load_index(shard)
        shards.append(shard)
    bar.close()
    return shards
