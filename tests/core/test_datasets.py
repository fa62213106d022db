"""vlv.data.datasets, sampling, loader, shards: one random-access interface over folders, tar shards, parquet and
memory; per-rank step batches."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlv.cli import main
from vlv.data.datasets import FolderDataset, InMemory, ParquetDataset, TarShards, decode, expand_braces, open_dataset
from vlv.data.images import load_image
from vlv.data.loader import StepLoader
from vlv.data.sampling import step_indices
from vlv.data.shards import index_path, write_shards
from vlv.shapes.data import write_shapes

SIZE = 48  # not the shapes images' 64: the resize path is compared too
N = 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("src") / "f", n=N, seed=0, progress=False)


@pytest.fixture(scope="module")
def reference(folder):
    return InMemory.of(folder, SIZE)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return write_shards(FolderDataset(folder), tmp_path_factory.mktemp("tars") / "t", shard_size=8)


def _pixels(ds, i):
    return decode(ds.read(i).image, SIZE)


def _parquet(folder, path, raw=False, row_group_size=6):
    """The folder as a parquet file: encoded PNG bytes (as an HF struct) or raw HxWx3 buffers + height/width."""
    ref = FolderDataset(folder)
    rows = [ref.read(i) for i in range(len(ref))]
    if raw:
        arrays = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in rows]
        table = pa.table({"image": [a.tobytes() for a in arrays], "caption": [s.caption for s in rows],
                          "height": [a.shape[0] for a in arrays], "width": [a.shape[1] for a in arrays]})
    else:
        table = pa.table({"image": [{"bytes": s.image, "path": None} for s in rows],
                          "caption": [s.caption for s in rows]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ------------------------------------------------------------------------------------------ random access
def test_every_format_reads_the_folders_samples(folder, reference, shards, tmp_path):
    datasets = {"folder": open_dataset(folder), "tar": open_dataset(shards[0].parent),
                "parquet": open_dataset(_parquet(folder, tmp_path / "enc.parquet")),
                "parquet-raw": open_dataset(_parquet(folder, tmp_path / "raw.parquet", raw=True))}
    assert isinstance(datasets["tar"], TarShards) and isinstance(datasets["parquet"], ParquetDataset)
    for name, ds in datasets.items():
        assert len(ds) == N, name
        for i in [0, 7, 8, 13, N - 1]:  # both sides of a shard boundary and of row groups
            assert np.array_equal(_pixels(ds, i), reference.images[i]), (name, i)
            assert ds.read(i).caption == reference.read(i).caption, (name, i)
    assert datasets["tar"].read(3).key == "000003"
    assert datasets["tar"].read(3).meta["scene"] == reference.read(3).meta["scene"]


def test_shards_keep_the_original_bytes(folder, shards):
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
        png = tf.extractfile("000001.png").read()
        meta = json.loads(tf.extractfile("000001.json").read())
    assert names[:3] == ["000000.png", "000000.txt", "000000.json"]
    assert png == (folder / "000001.png").read_bytes() and meta["key"] == "000001" and "scene" in meta
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(shards[0].parent.glob("*.tmp"))


def test_index_is_built_once_and_rebuilt_when_the_shard_changes(shards, tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(shards[0].read_bytes())
    TarShards([shard])
    idx = index_path(shard)
    first = idx.stat().st_mtime_ns
    os.utime(idx, ns=(first - 10**9, first - 10**9))  # backdate so a rewrite would surely show
    before = idx.stat().st_mtime_ns
    assert len(TarShards([shard])) == 8 and idx.stat().st_mtime_ns == before
    shard.write_bytes(shards[2].read_bytes())  # another shard's content in its place
    ds = TarShards([shard])
    assert idx.stat().st_mtime_ns != before and len(ds) == N - 16 and ds.read(0).key == "000016"


def _copy_shards(shards, folder):
    folder.mkdir()
    for shard in shards:
        (folder / shard.name).write_bytes(shard.read_bytes())
    return sorted(folder.glob("*.tar"))


def test_a_read_only_datasets_indexes_go_to_the_cache_dir_once(shards, tmp_path, monkeypatch):
    """Indexes of shards in a folder vlv cannot write are built once into the cache dir and reused (the probe is
    faked: tests may run as root, who writes anywhere)."""
    from vlv.data import shards as shards_module

    data, cache = tmp_path / "data", tmp_path / "cache"
    copies = _copy_shards(shards, data)
    monkeypatch.setenv(shards_module.INDEX_CACHE_ENV, str(cache))
    monkeypatch.setattr(shards_module, "_can_write", lambda folder: Path(folder) != data)
    assert len(TarShards(copies)) == N
    assert not any(index_path(s).exists() for s in copies)
    saved = sorted(cache.glob("*.idx.json"))
    assert len(saved) == len(copies) and all(shards_module.cached_index_path(s) in saved for s in copies)
    monkeypatch.setattr(shards_module, "build_index", lambda shard: pytest.fail(f"{shard} indexed again"))
    assert TarShards(copies).read(N - 1).key == f"{N - 1:06d}"


def test_a_rank_that_does_not_build_waits_for_the_builders_index(shards, tmp_path, monkeypatch):
    """Under a launcher local rank 0 indexes; rank 1 reads what it saved, and builds itself only when nothing
    comes within the wait."""
    import threading

    from vlv.data import shards as shards_module

    copies = _copy_shards(shards, tmp_path / "data")
    build, save = shards_module.build_index, shards_module.save_index
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")

    def rank0():
        for shard in copies:
            save(shard, build(shard))

    calls = []
    monkeypatch.setattr(shards_module, "build_index", lambda shard: calls.append(shard) or build(shard))
    builder = threading.Timer(0.5, rank0)
    builder.start()
    try:
        assert len(TarShards(copies)) == N and calls == []  # waited, built nothing
    finally:
        builder.join()
    for shard in copies:
        index_path(shard).unlink()
    monkeypatch.setattr(shards_module, "INDEX_WAIT_S", 0.3)  # no builder at all: build after the wait
    assert len(TarShards(copies)) == N and calls == copies


def test_webdataset_members_json_captions_and_brace_patterns(tmp_path):
    """An img2dataset-style shard: jpg + json with the caption (no txt), a dir prefix, members out of order."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG")
    for s in range(2):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tf:
            for name, data in [(f"d/{s}0001.json", json.dumps({"caption": f"red {s}", "url": "u"}).encode()),
                               (f"d/{s}0001.jpg", buf.getvalue()), (f"d/{s}0002.txt", b"no image")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    assert expand_braces(str(tmp_path / "{00000..00001}.tar")) == [str(tmp_path / f"0000{k}.tar") for k in (0, 1)]
    ds = open_dataset(str(tmp_path / "{00000..00001}.tar"))
    assert len(ds) == 2 and [ds.read(k).caption for k in (0, 1)] == ["red 0", "red 1"]
    assert ds.read(1).key == "d/10001" and ds.read(1).meta == {"url": "u"}
    assert np.array_equal(_pixels(ds, 0), load_image(Image.open(buf), SIZE))
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        open_dataset(str(tmp_path / "{00000..00002}.tar"))


def test_open_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv"):
        open_dataset(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="no captions.jsonl"):
        open_dataset(tmp_path)
    pq.write_table(pa.table({"jpg": [b"x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no image column 'image'"):
        open_dataset(tmp_path / "p.parquet")


# ---------------------------------------------------------------------------------------------- sampling
def test_ranks_are_disjoint_and_an_epoch_covers_every_sample_once():
    n, batch, world = 23, 4, 2
    steps = [[step_indices(n, 7, k, r, world, batch) for r in range(world)] for k in range(9)]
    for a, b in steps:
        assert len(set(a.tolist()) | set(b.tolist())) == world * batch  # also across an epoch boundary
    flat = np.concatenate([x for pair in steps for x in pair])  # global stream order: step-major, then rank
    assert sorted(flat[:n].tolist()) == list(range(n)) and sorted(flat[n : 2 * n].tolist()) == list(range(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # a new permutation each epoch
    assert np.array_equal(step_indices(n, 7, 5, 1, world, batch), steps[5][1])  # pure
    assert not np.array_equal(step_indices(n, 8, 5, 1, world, batch), steps[5][1])
    # Far into training (no epoch before is needed): every step distinct, every whole epoch complete.
    first, count = 1000, 3 * n
    far = np.stack([np.concatenate([step_indices(n, 7, k, r, world, batch) for r in range(world)])
                    for k in range(first, first + count)])  # (count, world * batch)
    assert all(len(set(row.tolist())) == world * batch for row in far)
    pos = first * world * batch + np.arange(far.size)
    for e in np.unique(pos // n)[1:-1]:
        assert sorted(far.ravel()[pos // n == e].tolist()) == list(range(n))


# ------------------------------------------------------------------------------------------------ loader
def _batches(ds, **kw):
    return list(StepLoader(ds, SIZE, seed=3, batch_size=6, **kw))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"] and x["step"] == y["step"]
        assert np.array_equal(x["indices"], y["indices"]) and np.array_equal(x["images"], y["images"])


def test_batches_are_the_same_for_any_workers_and_on_resume(shards, reference):
    ds = TarShards(shards)
    full = _batches(ds, steps=6)
    assert [b["images"].shape for b in full] == [(6, SIZE, SIZE, 3)] * 6 and full[0]["images"].dtype == torch.uint8
    assert all(b["bad"] == 0 for b in full)
    for b in full:
        assert np.array_equal(b["images"], reference.images[b["indices"].numpy()])
    _same(full, _batches(ds, steps=6, num_workers=2))
    _same(full[4:], _batches(ds, start_step=4, steps=2))
    _same(full[4:], _batches(ds, start_step=4, steps=2, num_workers=1))


def test_in_memory_is_a_dataset_served_like_the_others(folder, reference, tmp_path):
    """The same samples, keys and batches as the folder it holds, its arrays passed through without a copy."""
    lazy = FolderDataset(folder)
    assert len(reference) == len(lazy) and reference.sample_keys() == lazy.sample_keys()
    assert decode(reference.read(3).image, SIZE) is reference.read(3).image
    assert reference.where(3) == lazy.where(3) and reference.captions[3] == lazy.read(3).caption
    _same(_batches(reference, steps=4), _batches(lazy, steps=4))
    with pytest.raises(ValueError, match="decoded at"):  # resizing again would not give the source's pixels
        decode(reference.read(3).image, 32)
    with pytest.raises(ValueError, match="loaded at 48 px"):  # refused whole, not skipped as bad samples
        StepLoader(reference, 32, seed=3, batch_size=6)
    tars = write_shards(reference, tmp_path / "t", shard_size=N)  # decoded samples are written as PNG
    assert np.array_equal(_pixels(TarShards(tars), 5), reference.images[5])


def test_a_corrupt_image_is_skipped_and_counted_or_named(folder, tmp_path):
    bad = tmp_path / "bad"
    write_shards(FolderDataset(folder), bad, shard_size=N)
    shard = bad / "00000.tar"
    data = bytearray(shard.read_bytes())
    ds = TarShards([shard])
    off, size = ds.image[5]
    data[off + 40 : off + size] = b"\0" * (size - 40)  # keep the PNG header, garble the stream
    shard.write_bytes(bytes(data))
    ds = TarShards([shard])
    batches = list(StepLoader(ds, SIZE, seed=0, batch_size=N, steps=1))
    assert batches[0]["bad"] == 1 and "000005" not in batches[0]["keys"] and len(batches[0]["images"]) == N - 1
    with pytest.raises(ValueError, match=r"000005.*00000\.tar"):
        list(StepLoader(ds, SIZE, seed=0, batch_size=N, steps=1, on_bad_image="fail"))


def test_a_truncated_shard_keeps_the_samples_before_the_cut(shards, tmp_path):
    shard = tmp_path / "00000.tar"
    whole = TarShards([shards[0]])
    shard.write_bytes(shards[0].read_bytes()[: int(whole.image[5, 0]) + 100])  # cut inside sample 5's image
    with pytest.warns(UserWarning, match="truncated"):
        ds = TarShards([shard])
    assert [ds.read(i).key for i in range(len(ds))] == [f"00000{i}" for i in range(5)]
    with pytest.warns(UserWarning, match="truncated"):  # the saved index says so too
        assert len(TarShards([shard])) == 5


def test_a_missing_folder_image_is_skipped(folder, tmp_path):
    copy = tmp_path / "f"
    copy.mkdir()
    for p in folder.iterdir():
        if p.name != "000002.png":
            (copy / p.name).write_bytes(p.read_bytes())
    batch = next(iter(StepLoader(FolderDataset(copy), SIZE, seed=0, batch_size=N, steps=1)))
    assert batch["bad"] == 1 and len(batch["keys"]) == N - 1
    with pytest.raises(ValueError, match="000002"):
        next(iter(StepLoader(FolderDataset(copy), SIZE, seed=0, batch_size=N, steps=1, on_bad_image="fail")))


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_converts_parquet_to_shards(folder, reference, tmp_path, capsys):
    src = _parquet(folder, tmp_path / "src.parquet")
    out = tmp_path / "shards"
    assert main(["data", "shards", str(src), "--out", str(out), "--shard-size", "7", "--quiet"]) == 0
    assert "wrote 20 samples in 3 shard(s)" in capsys.readouterr().out
    ds = open_dataset(out)
    assert len(ds) == N and ds.read(9).key == "src_9" and ds.read(9).caption == reference.read(9).caption
    assert np.array_equal(_pixels(ds, 9), reference.images[9])
    assert all(index_path(s).exists() for s in sorted(out.glob("*.tar")))
    assert main(["data", "shards", str(src), "--out", str(out), "--shard-size", "7"]) == 2  # holds shards already
    assert main(["data", "shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_workers_leave_a_group_signal_to_the_training_process():
    """SIGTERM to the process group (schedulers, Ctrl-C) must not kill the workers under the training loop."""
    import signal

    from vlv.data.loader import _seed_worker

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        _seed_worker(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
