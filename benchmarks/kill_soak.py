"""Kill soak: every training command, SIGKILLed at random moments and resumed, ends where an uninterrupted run does.

    python benchmarks/kill_soak.py [--kills 10] [--commands teacher lm stage1 stage2 precompute] [--seed 0]
                                   [--out results/kill_soak.json]

For each command on tiny data (made here) the soak of ``vlv.testing``: one uninterrupted run, then the same
command started again and again, its process group SIGKILLed at a random moment (the training commands checkpoint
every step, so kills land in start-up, in steps and in checkpoint writes) until ``--kills`` kills have happened,
then once more to the end; every killed state must load and the results must equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from vlv.testing import soak

EVERY_STEP = ["--batch-size", "4", "--checkpoint-every", "1"]


def commands(data: Path, shards: Path) -> dict[str, list[str]]:
    """Each command's argument list after ``vlv`` (without --out)."""
    return {
        "teacher": ["teacher", "train", "--tiny", "--data", str(data), "--vae-steps", "8", "--vae-batch-size", "4",
                    "--unet-steps", "8", "--unet-batch-size", "4", "--unet-warmup-steps", "0", "--unet-eval-every",
                    "0", "--vae-eval-every", "0", "--vae-checkpoint-every", "1", "--unet-checkpoint-every", "1"],
        "lm": ["train", "lm", "--data", str(data), "--steps", "120", *EVERY_STEP],
        "stage1": ["train", "stage1", "--decoder", "shapes-teacher", "--data", str(data), "--nq", "8", "--steps", "40",
                   *EVERY_STEP],
        "stage2": ["train", "stage2", "--decoder", "shapes-teacher", "--encoder", "shapes-stage1", "--lm", "shapes-lm",
                   "--data", str(data), "--steps", "40", *EVERY_STEP],
        "precompute": ["precompute", "latents", "--decoder", "shapes-teacher", "--data", str(shards),
                       "--shard-rows", "8"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs per command")
    p.add_argument("--commands", nargs="+", default=["teacher", "lm", "stage1", "stage2", "precompute"])
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    from vlv.data.datasets import FolderDataset
    from vlv.data.shards import write_shards
    from vlv.shapes.data import write_shapes

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vlv-kill-soak-") as tmp:
        root = Path(tmp)
        data = write_shapes(root / "data", n=48, seed=0, split="train", progress=False)
        shards = root / "shards"
        write_shards(FolderDataset(data), shards, shard_size=16)
        todo = commands(data, shards)
        rows = {name: soak(name, todo[name], root, args.kills, rng) for name in args.commands}
    ok = all(r["equal"] and not r["unloadable"] for r in rows.values())
    print("all resumed to the uninterrupted results" if ok else "FAILED", flush=True)
    if args.out:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import write_result

        write_result(args.out, {"kills": args.kills, "seed": args.seed, "commands": rows, "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
