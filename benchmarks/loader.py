"""Data loader throughput: decoding 512-px JPEGs to 384 px (centre crop + bicubic) from tar shards and from parquet.

    python benchmarks/loader.py [--n 512] [--workers 1 2] [--batch 32] [--out results/loader.json]

Makes its own data in a temporary dir (random JPEGs: smooth noise + a few shapes, so they compress like photos
more than like flat colour), then iterates ``vlv.data.loader.StepLoader`` over one epoch per (format, workers) and
reports images/s, in all and per worker. The first batch (worker start-up) is timed apart: steady throughput is
what a long run sees.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result  # benchmarks/
from PIL import Image, ImageDraw


def make_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A photo-like JPEG: upsampled colour noise plus a few filled shapes."""
    low = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 12, (size, size, 3))
    im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 16, size // 4))
        box = [int(x) - r, int(y) - r, int(x) + r, int(y) + r]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int, size: int, shard_size: int, row_group: int) -> dict[str, Path]:
    """The same n JPEGs as a folder, as tar shards (via write_shards) and as one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlv.data.datasets import FolderDataset
    from vlv.data.shards import write_shards

    rng = np.random.default_rng(0)
    folder = root / "folder"
    folder.mkdir()
    rows, blobs = [], []
    for i in range(n):
        data = make_jpeg(rng, size)
        (folder / f"{i:06d}.jpg").write_bytes(data)
        rows.append({"image": f"{i:06d}.jpg", "caption": f"image {i}"})
        blobs.append(data)
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shards(FolderDataset(folder), root / "tars", shard_size)
    pq.write_table(pa.table({"image": blobs, "caption": [r["caption"] for r in rows]}), root / "data.parquet",
                   row_group_size=row_group)
    return {"tar": root / "tars", "parquet": root / "data.parquet"}


def throughput(path: Path, size: int, batch: int, workers: int, steps: int) -> dict[str, float]:
    """Images/s over ``steps`` batches of one rank, the first batch (start-up) timed apart."""
    from vlv.data.datasets import open_dataset
    from vlv.data.loader import StepLoader

    loader = StepLoader(open_dataset(path), size, seed=0, batch_size=batch, steps=steps, num_workers=workers,
                        prefetch_factor=2)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    images = sum(len(b["images"]) for b in it)
    t2 = time.perf_counter()
    rate = images / (t2 - t1) if images else float("nan")
    assert first["images"].shape[1:] == (size, size, 3)
    return {"images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1), "first_batch_s": t1 - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images (default 512)")
    parser.add_argument("--source-size", type=int, default=512, help="JPEG side (default 512)")
    parser.add_argument("--size", type=int, default=384, help="decoded side (default 384)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=128, help="samples per tar shard (default 128)")
    parser.add_argument("--row-group", type=int, default=64, help="parquet rows per row group (default 64)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    steps = args.n // args.batch
    if steps < 2:
        parser.error("--n must hold at least two batches")
    results = []
    with tempfile.TemporaryDirectory(prefix="vlv-loader-") as tmp:
        t0 = time.perf_counter()
        paths = make_data(Path(tmp), args.n, args.source_size, args.shard_size, args.row_group)
        print(f"made {args.n} {args.source_size}-px JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        for fmt, path in paths.items():
            for workers in args.workers:
                r = {"format": fmt, "workers": workers,
                     **throughput(path, args.size, args.batch, workers, steps)}
                results.append(r)
                print(f"{fmt:8s} workers={workers}  {r['images_per_s']:7.1f} img/s  "
                      f"{r['images_per_s_per_worker']:7.1f} img/s/worker  first batch {r['first_batch_s']:.2f}s",
                      flush=True)
    write_result(args.out, {"n": args.n, "source_size": args.source_size, "size": args.size, "batch": args.batch,
                            "shard_size": args.shard_size, "row_group": args.row_group, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
