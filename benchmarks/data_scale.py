"""Data at scale: stage 1's memory does not grow with the dataset, and streaming from shards keeps its step time.

    python benchmarks/data_scale.py [--sizes 2000 50000] [--steps 50] [--px 384] [--distinct 300]
                                    [--shapes-n 2000] [--time-steps 60] [--out results/data_scale.json]

1. Peak RSS of a short stage-1 run (the shipped ``shapes-teacher``, encoder ``shapes``, online VAE) fed from tar
   shards of N images stored at ``--px`` px, for each N of ``--sizes``: the training process's own peak and its
   DataLoader workers' (largest child). The shards are made cheaply: ``--distinct`` photo-like JPEGs
   (``loader.make_jpeg``) repeated under distinct keys, so N costs disk, not minutes. Today's in-RAM folder would
   hold N x px x px x 3 bytes; the streamed run holds an index of N keys and offsets.
2. Stage-1 step time on the shapes world (``--shapes-n`` scenes, the teacher's resolution, latents cached as the
   recipe does): fed from shards by 2 workers vs from RAM (an InMemory), the same batches; the ratio
   RAM / shards is the throughput kept (1.0: streaming costs nothing).

Each measurement runs in its own process (``--child``), so one's peak RSS never leaks into another's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def write_repeated_shards(out: Path, n: int, px: int, distinct: int, shard_size: int = 10_000) -> Path:
    """n samples in webdataset shards: ``distinct`` JPEGs cycled under keys 000000000, ... with a caption each."""
    sys.path.insert(0, str(BENCH))
    from loader import make_jpeg  # benchmarks/

    rng = np.random.default_rng(0)
    blobs = [make_jpeg(rng, px) for _ in range(distinct)]
    out.mkdir(parents=True, exist_ok=True)
    for s in range(-(-n // shard_size)):
        tmp, final = out / f"{s:05d}.tar.tmp", out / f"{s:05d}.tar"
        with tarfile.open(tmp, "w") as tf:
            for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                for name, data in ((f"{i:09d}.jpg", blobs[i % distinct]), (f"{i:09d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tf.addfile(info, io.BytesIO(data))
        os.replace(tmp, final)
    return out


def _rss_gib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------------------------------- child runs
def child_rss(data: str, steps: int, batch: int, workers: int, out: Path) -> dict:
    """A stage-1 run on ``data``: its peak RSS and its workers'."""
    from vlv.training.config import Stage1Settings, TrainConfig
    from vlv.training.stage1 import train_stage1

    settings = Stage1Settings(decoder="shapes-teacher", data=data, encoder="shapes", num_queries=16,
                              cache_latents=False, num_workers=workers)
    t0 = time.perf_counter()
    train_stage1(settings, TrainConfig(steps=steps, batch_size=batch, progress=False, checkpoint_every=10**9),
                 out, progress=False)
    return {"seconds": round(time.perf_counter() - t0, 1), "rss_gib": round(_rss_gib(resource.RUSAGE_SELF), 3),
            "workers_rss_gib": round(_rss_gib(resource.RUSAGE_CHILDREN), 3)}


def child_step_time(source: str, data: str, steps: int, batch: int, workers: int, out: Path) -> dict:
    """Seconds per step of stage 1 (latents cached) after two warm-up steps, from RAM or streamed."""
    from vlv.data.datasets import InMemory, open_dataset
    from vlv.decoder import DiffusionDecoder
    from vlv.training.caches import run_caches
    from vlv.training.config import Stage1Settings, TrainConfig
    from vlv.training.loop import make_accelerator, train
    from vlv.training.stage1 import Stage1Task, build_encoder

    cfg = TrainConfig(steps=steps, batch_size=batch, progress=False, log_every=1, checkpoint_every=10**9)
    settings = Stage1Settings(decoder="shapes-teacher", data=data, encoder="shapes", num_queries=16,
                              num_workers=workers)
    decoder = DiffusionDecoder.from_pretrained("shapes-teacher")
    encoder = build_encoder(settings, decoder.text_dim, 0)
    accelerator = make_accelerator(cfg)
    latents, _ = run_caches(settings, decoder, encoder, open_dataset(data), decoder.image_size, out / "cache",
                            accelerator, progress=False)
    images = InMemory.of(Path(data), decoder.image_size) if source == "ram" else open_dataset(data)
    task = Stage1Task(encoder, decoder, images, latents, seed=0, num_workers=workers)
    state = train(task, cfg, out / "run", accelerator)
    task.close()
    t = {r["step"]: r["elapsed_s"] for r in state.history if "loss" in r}
    return {"s_per_step": (t[steps] - t[2]) / (steps - 2), "rss_gib": round(_rss_gib(resource.RUSAGE_SELF), 3)}


def _child(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 50_000], help="dataset sizes for the RSS runs")
    p.add_argument("--steps", type=int, default=50, help="stage-1 steps per RSS run")
    p.add_argument("--px", type=int, default=384, help="stored image size of the RSS shards")
    p.add_argument("--distinct", type=int, default=300, help="distinct JPEGs behind the keys")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shapes-n", type=int, default=2000, help="shapes scenes for the step-time comparison")
    p.add_argument("--time-steps", type=int, default=60, help="steps per step-time run (the first 2 not timed)")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "rss":
            result = child_rss(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), Path(rest[4]))
        else:
            result = child_step_time(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]), Path(rest[5]))
        print(json.dumps(result))
        return

    sys.path.insert(0, str(BENCH))
    from common import write_result  # benchmarks/

    result: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")}}
    with tempfile.TemporaryDirectory(prefix="vlv-data-scale-") as tmp:
        root = Path(tmp)
        rss = {}
        for n in args.sizes:
            t0 = time.perf_counter()
            shards = write_repeated_shards(root / f"shards{n}", n, args.px, args.distinct)
            made = time.perf_counter() - t0
            rss[n] = _child(["rss", str(shards), str(args.steps), str(args.batch), str(args.workers),
                             str(root / f"run{n}")])
            rss[n]["shards_s"] = round(made, 1)
            rss[n]["in_ram_gib"] = round(n * args.px * args.px * 3 / 2**30, 2)  # what InMemory would hold
            print(f"{n} images at {args.px} px: peak RSS {rss[n]['rss_gib']:.3f} GiB (workers "
                  f"{rss[n]['workers_rss_gib']:.3f} GiB; in RAM the images alone: {rss[n]['in_ram_gib']} GiB), "
                  f"run {rss[n]['seconds']}s", flush=True)
        small, large = min(args.sizes), max(args.sizes)
        ratio = rss[large]["rss_gib"] / rss[small]["rss_gib"]
        result["rss"] = {str(k): v for k, v in rss.items()} | {"ratio_large_small": round(ratio, 3)}
        print(f"peak RSS {large} / {small} images: {ratio:.3f}x", flush=True)

        from vlv.data.datasets import FolderDataset
        from vlv.data.shards import write_shards
        from vlv.shapes.data import write_shapes

        folder = write_shapes(root / "shapes", n=args.shapes_n, seed=0, split="train", progress=False)
        tars = root / "shapes-tars"
        write_shards(FolderDataset(folder), tars, shard_size=1000)
        ram = _child(["time", "ram", str(folder), str(args.time_steps), str(args.batch), "0", str(root / "ram")])
        streamed = _child(["time", "shards", str(tars), str(args.time_steps), str(args.batch), str(args.workers),
                           str(root / "streamed")])
        keep = ram["s_per_step"] / streamed["s_per_step"]
        result["step_time"] = {"ram": ram, "shards": streamed, "throughput_kept": round(keep, 3)}
        print(f"stage-1 step on {args.shapes_n} shapes scenes: RAM {ram['s_per_step'] * 1e3:.1f} ms, shards with "
              f"{args.workers} workers {streamed['s_per_step'] * 1e3:.1f} ms: {keep:.3f}x the RAM throughput")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
