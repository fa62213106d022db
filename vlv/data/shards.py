"""Tar shards (webdataset / img2dataset layout): the per-shard index of member offsets, and writing a dataset.

vlv indexes a shard itself, once, into ``<shard>.idx.json``: webdataset's own library only streams (no random
access, resume left to the user), and ``wids`` copies shards into a cache; its idea (an index of member offsets,
then plain seek + read) is what :class:`vlv.data.datasets.TarShards` does, without the dependency. A shard in a
folder vlv cannot write has its index in a cache dir instead (:func:`index_cache_dir`). Under a launcher
(torchrun, accelerate) the local rank 0 of each node builds a missing index and the other ranks wait for it, so a
dataset is indexed once, not once per rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vlv.data.images import BAD_IMAGE_ERRORS, _reason, encoded_format
from vlv.errors import BadImage, InvalidInput
from vlv.progress import tqdm

if TYPE_CHECKING:  # datasets reads the index; writing only takes one
    from vlv.data.datasets import Dataset

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 1
INDEX_CACHE_ENV = "VLV_INDEX_CACHE"
INDEX_WAIT_S = 300.0  # how long another rank waits for the builder's next index before building it itself


# ---------------------------------------------------------------------------------------------------- index
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


def index_cache_dir() -> Path:
    """Where the indexes of shards in read-only folders go: ``$VLV_INDEX_CACHE``, else
    ``$XDG_CACHE_HOME/vlv/tar-index`` (``~/.cache/vlv/tar-index``)."""
    if os.environ.get(INDEX_CACHE_ENV):
        return Path(os.environ[INDEX_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlv" / "tar-index"


def cached_index_path(shard: Path) -> Path:
    """The shard's index in the cache dir, named by a hash of its absolute path (shards of two datasets may share
    a name)."""
    real = Path(shard).resolve()
    return index_cache_dir() / f"{real.name}.{hashlib.sha256(str(real).encode()).hexdigest()[:16]}{INDEX_SUFFIX}"


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _saved_index(shard: Path, st: os.stat_result) -> dict[str, Any] | None:
    """A saved index of this very shard (its size and mtime), beside it or in the cache dir."""
    for path in (index_path(shard), cached_index_path(shard)):
        try:
            index = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # absent, torn or unreadable
        if (index.get("version") == INDEX_VERSION and index.get("shard_bytes") == st.st_size
                and index.get("shard_mtime_ns") == st.st_mtime_ns):
            return index
    return None


def save_index(shard: Path, index: dict[str, Any]) -> Path | None:
    """Write the index atomically beside the shard, or in the cache dir when the shard's folder is not writable;
    None when neither can be written (then every open rebuilds it)."""
    for path in (index_path(shard), cached_index_path(shard)):
        if path.parent.exists() and not _can_write(path.parent):
            continue
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks indexing at once never collide
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(index))
            os.replace(tmp, path)
            return path
        except OSError:
            tmp.unlink(missing_ok=True)
    return None


def _builds_indexes() -> bool:
    """Whether this process builds missing indexes: alone, or local rank 0 under a launcher (one per node, since
    nodes may read their own copies of the data)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))) < 2 or \
        int(os.environ.get("LOCAL_RANK", 0)) == 0


class IndexWait:
    """A non-building rank's patience over the shards of one dataset: it waits for the builder while the builder
    makes progress (each index it finds restarts the clock), then builds what is still missing itself."""

    def __init__(self, seconds: float | None = None):
        self.seconds = INDEX_WAIT_S if seconds is None else seconds
        self.deadline = time.monotonic() + self.seconds

    def for_index(self, shard: Path, st: os.stat_result) -> dict[str, Any] | None:
        while True:
            index = _saved_index(shard, st)
            if index is not None:
                self.deadline = time.monotonic() + self.seconds
                return index
            if time.monotonic() > self.deadline:
                return None
            time.sleep(0.2)


def load_index(shard: Path, wait: IndexWait | None = None) -> dict[str, Any]:
    """The shard's saved index when it matches the shard's size and mtime (beside it or in the cache dir); else
    built and saved (atomically) by this process, or, on a rank that does not build, waited for (``wait``: one
    clock over a dataset's shards)."""
    st = shard.stat()
    index = _saved_index(shard, st)
    if index is None and not _builds_indexes():
        index = (wait or IndexWait()).for_index(shard, st)
    if index is not None:
        return _warn_truncated(shard, index)
    try:
        index = build_index(shard)
    except tarfile.TarError as e:
        raise InvalidInput(f"{shard}: not a readable tar ({e})") from None
    if save_index(shard, index) is None:
        warnings.warn(f"cannot save the index of {shard} beside it nor in {index_cache_dir()} (set "
                      f"{INDEX_CACHE_ENV} to a writable folder); rebuilt on every open", stacklevel=2)
    return _warn_truncated(shard, index)


def _warn_truncated(shard: Path, index: dict[str, Any]) -> dict[str, Any]:
    if index.get("truncated"):
        warnings.warn(f"{shard} is truncated: only its {len(index['keys'])} samples before the cut are read",
                      stacklevel=3)
    return index


# ---------------------------------------------------------------------------------------------------- write
def _image_member(image: Image.Image | bytes | np.ndarray, source: str = "") -> tuple[str, bytes]:
    """(extension, bytes): the original encoding where tars keep it, else lossless PNG."""
    if isinstance(image, bytes):
        if fmt := encoded_format(image):
            return fmt, image
        try:
            with Image.open(io.BytesIO(image)) as im:
                return _image_member(im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L") else im.copy())
        except BAD_IMAGE_ERRORS as e:
            raise BadImage(f"{source}: not a readable image ({_reason(e)})") from None
    if isinstance(image, np.ndarray):  # decoded already (an InMemory dataset)
        image = Image.fromarray(image)
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
    if any(out.glob("*.tar")):  # stale shards would join the new ones when the dir is opened
        raise FileExistsError(f"{out} already holds .tar shards")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_shards(src, out, shard_size, progress)
    except BaseException:  # a bad sample, or a kill: no half set of shards (a re-run would refuse it)
        for f in out.glob("*.tar*"):
            f.unlink()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_shards(src: Dataset, out: Path, shard_size: int, progress: bool) -> list[Path]:
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
                ext, data = _image_member(sample.image, src.where(i))
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
