"""Image-caption data behind one random-access interface: folders, tar shards, parquet, and a dataset in memory.

Every format answers ``len(ds)``, ``ds.read(i) -> Sample`` and ``ds.where(i)``. The lazy ones hold none of their
images: a folder keeps only its records, tar shards a per-shard index of member offsets (:mod:`vlv.data.shards`),
parquet one or two row groups; decoding (:func:`decode`, the centre square crop + bicubic resize of
:func:`vlv.data.images.square`) runs in the DataLoader workers (:mod:`vlv.data.loader`). :class:`InMemory` holds
another dataset decoded once (small data: the shapes world, evaluation sets), and is read the same way.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlv.data.images import BAD_IMAGE_ERRORS, IMAGE_EXTENSIONS, Crop, as_crop, encoded_format, open_image
from vlv.data.records import CAPTIONS, read_records
from vlv.data.shards import TAR_IMAGE_EXTENSIONS, IndexWait, load_index
from vlv.errors import BadImage, InvalidInput
from vlv.progress import tqdm


@dataclass
class Sample:
    """One image-caption pair as stored: ``image`` still encoded (bytes) where the format keeps it so."""

    key: str
    image: Image.Image | bytes | np.ndarray  # ndarray: decoded already (InMemory), uint8 (H, W, 3)
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields (a folder's "scene", a tar's json)
    source: str = ""  # the file it came from, for error messages


def decode(image: Image.Image | bytes | np.ndarray, size: int | Crop) -> np.ndarray:
    """Encoded bytes or a PIL image -> RGB uint8 (size, size, 3), cut by the :class:`~vlv.data.images.Crop` given
    (a size: vlv's centre square, :func:`vlv.data.images.square`); an array decoded already (:class:`InMemory`,
    vlv's square) is returned as it is, and refused at another size or crop: cutting it again would not give the
    pixels of the source."""
    crop = as_crop(size)
    if isinstance(image, np.ndarray):
        if image.shape != (crop.size, crop.size, 3) or crop.kind != "vlv":
            raise ValueError(f"a sample decoded at {image.shape[:2]} px (vlv's square crop) is asked for at "
                             f"{crop.size} px ({crop.kind} crop)")
        return image
    return crop(open_image(image))


class Dataset(ABC):
    """Random access to image-caption samples (the lazy formats hold none of the images)."""

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

    def caption(self, i: int) -> str | None:
        """Sample ``i``'s caption, its image never decoded: what a step that reads cached image rows needs."""
        return self.read(i).caption

    def require_size(self, size: int | Crop) -> None:
        """Raise unless the samples can be decoded at ``size`` px, or by that crop (any, unless decoded already)."""
        return None

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

    def caption(self, i: int) -> str | None:
        return self.records[self._check(i)].caption


def _folder_key(image: str) -> str:
    return Path(image).with_suffix("").as_posix()


# ----------------------------------------------------------------------------------------------- tar shards
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
        wait = IndexWait()  # a rank that does not build waits for the builder's indexes, shard after shard
        for s in self.shards:
            index = load_index(s, wait)
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
            if h and w and len(data) == h * w * 3 and encoded_format(data) is None:
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


# ------------------------------------------------------------------------------------------------ in memory
class ImageFiles(Dataset):
    """Image files a user names, in order, without captions: what the inference commands read."""

    def __init__(self, paths: list[str | Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> Sample:
        path = self.paths[self._check(i)]
        return Sample(str(path), path.read_bytes(), None, {}, str(path))

    def where(self, i: int) -> str:
        return str(self.paths[self._check(i)])


class InMemory(Dataset):
    """Another dataset decoded once at one size, held as uint8 (N, size, size, 3): ``images``.

    A :class:`Dataset` like the others, so training serves it through the same loader; ``read(i).image`` is the
    decoded array, which :func:`decode` passes through. For small data (the shapes world, evaluation sets).
    """

    def __init__(self, source: Dataset, size: int, limit: int | None = None, progress: bool = False,
                 skip_bad: bool = False):
        """The first ``limit`` samples; ``skip_bad``: drop unreadable ones (named in ``self.bad``) instead of
        raising :class:`BadImage`."""
        self.source, self.size = source, size
        self.bad: list[str] = []
        images, kept = [], []
        for i in tqdm(range(min(len(source), limit if limit is not None else len(source))), desc="loading images",
                      disable=not progress, leave=False):
            try:
                sample = source.read(i)
                images.append(decode(sample.image, size))
            except BAD_IMAGE_ERRORS as e:
                if not skip_bad:
                    raise BadImage(f"{source.where(i)}: {e}") from None
                self.bad.append(source.where(i))
                continue
            kept.append((i, sample))
        if not images:
            raise InvalidInput(f"none of the {len(self.bad)} images read is readable (first {self.bad[0]})")
        self.images = np.stack(images)  # (N, H, W, 3) uint8
        self.samples = [Sample(s.key, self.images[j], s.caption, s.meta, s.source) for j, (_, s) in enumerate(kept)]
        self._where = [source.where(i) for i, _ in kept]

    @classmethod
    def of(cls, path: str | Path, size: int, limit: int | None = None, progress: bool = False,
           skip_bad: bool = False) -> InMemory:
        """The dataset at ``path`` (:func:`open_dataset`) decoded into memory."""
        return cls(open_dataset(path), size, limit, progress, skip_bad)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> Sample:
        return self.samples[self._check(i)]

    def where(self, i: int) -> str:
        return self._where[self._check(i)]

    def sample_keys(self) -> list[str]:
        return [s.key for s in self.samples]

    def require_size(self, size: int | Crop) -> None:
        crop = as_crop(size)
        if crop.size != self.size or crop.kind != "vlv":
            raise ValueError(f"the data was loaded at {self.size} px by vlv's square crop, {crop.size} px by the "
                             f"{crop.kind} crop are asked for")

    @property
    def captions(self) -> list[str]:
        """Every caption; raises when a sample has none (this needs image-caption data)."""
        missing = [j for j, s in enumerate(self.samples) if s.caption is None]
        if missing:
            raise InvalidInput(f"{len(missing)} of {len(self)} images have no caption "
                               f"(first {self.where(missing[0])}); this needs image-caption data")
        return [s.caption for s in self.samples]  # type: ignore[misc]

    def batches(self, batch_size: int) -> list[np.ndarray]:
        """Index batches over the samples in order; the last may be short."""
        return [np.arange(start, min(start + batch_size, len(self))) for start in range(0, len(self), batch_size)]


def require_readable(dataset: Dataset, name: str | Path) -> None:
    """Raise unless some sample's image reads. Training skips a bad image and a cache leaves its row empty, so a
    set whose every image is corrupt or missing would pass every other check, then fail minutes in (or cache
    nothing). Stops at the first readable sample: a good set costs one read."""
    first = ""
    for i in range(len(dataset)):
        try:
            image = dataset.read(i).image
            if not isinstance(image, np.ndarray):  # decoded already: it read
                open_image(image, check_only=True)
            return
        except BAD_IMAGE_ERRORS as e:
            first = first or f"{dataset.where(i)}: {e}"
    raise InvalidInput(f"{name}: none of its {len(dataset)} samples has a readable image (first {first})")


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
