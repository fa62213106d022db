"""Kill soak: every training command, SIGKILLed at random moments and resumed, ends where an uninterrupted run does.

    python benchmarks/kill_soak.py [--kills 10] [--commands teacher lm stage1 stage2 precompute] [--seed 0]
                                   [--out results/kill_soak.json]

For each command on tiny data (made here): one uninterrupted run, then the same command started again and again,
its process group SIGKILLed after a random delay (uniform over 0.05-0.6 of the reference run's wall time, so kills
land in start-up, in steps and in checkpoint writes: the training commands checkpoint every step; and the work
left shrinks slowly) until ``--kills`` kills have happened, then once more to the end. A start that finishes
before its kill ends the soak early, with fewer kills (reported). After every kill the run dir must be loadable
(any checkpoint's trainer.json parses and its safetensors read; a cache's finished shards read), and at the end
every safetensors file outside checkpoints must equal the uninterrupted run's, tensor bytes and metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

EVERY_STEP = ["--batch-size", "4", "--checkpoint-every", "1"]


def commands(data: Path, shards: Path) -> dict[str, list[str]]:
    """Each command's argument list after ``vlv`` (without --out)."""
    return {
        "teacher": ["teacher", "train", "--tiny", "--data", str(data), "--vae-steps", "8", "--vae-batch", "4",
                    "--unet-steps", "8", "--unet-batch", "4", "--unet-warmup", "0", "--eval-every", "0",
                    "--vae-eval-every", "0", "--checkpoint-every", "1"],
        "lm": ["train", "lm", "--data", str(data), "--steps", "120", *EVERY_STEP],
        "stage1": ["train", "stage1", "--decoder", "shapes-teacher", "--data", str(data), "--nq", "8", "--steps", "40",
                   *EVERY_STEP],
        "stage2": ["train", "stage2", "--decoder", "shapes-teacher", "--encoder", "shapes-stage1", "--lm", "shapes-lm",
                   "--data", str(data), "--steps", "40", *EVERY_STEP],
        "precompute": ["precompute", "latents", "--decoder", "shapes-teacher", "--data", str(shards),
                       "--shard-rows", "8"],
    }


def _run(argv: list[str], out: Path, kill_after: float | None) -> tuple[bool, float]:
    """Start ``vlv argv --out out``; SIGKILL its process group after ``kill_after`` s. (finished, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "vlv.cli", *argv, "--out", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        _, err = p.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return False, time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"vlv {' '.join(argv)} failed:\n{err.decode()[-3000:]}")
    return True, time.perf_counter() - t0


def content(f: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes) and metadata: its header's key order
    is not fixed (a hash map), so the file's bytes may differ where its content does not."""
    h = hashlib.sha256()
    with safe_open(f, "pt") as g:
        h.update(json.dumps(g.metadata() or {}, sort_keys=True).encode())
        for k in sorted(g.keys()):
            t = g.get_tensor(k)
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digests(out: Path) -> dict[str, str]:
    """The content of every safetensors file that is a result (not a checkpoint's)."""
    return {str(f.relative_to(out)): content(f) for f in sorted(out.rglob("*.safetensors"))
            if not any(part.startswith("checkpoint") for part in f.relative_to(out).parts)}


def loadable(out: Path) -> list[str]:
    """What of a killed run dir would not load: checkpoints (trainer.json + safetensors) and finished files."""
    problems = []
    for ckpt in out.rglob("checkpoint"):
        if not ckpt.is_dir():
            continue
        try:
            json.loads((ckpt / "trainer.json").read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{ckpt}/trainer.json: {e}")
    for f in out.rglob("*.safetensors"):  # temps carry a .tmp suffix, so every *.safetensors is a finished file
        try:
            with safe_open(f, "pt") as g:
                for k in g.keys():
                    g.get_slice(k)
        except Exception as e:  # noqa: BLE001 -- any unreadable file is the finding
            problems.append(f"{f}: {e}")
    return problems


def soak(name: str, argv: list[str], root: Path, kills: int, rng: random.Random) -> dict:
    ref = root / f"{name}-ref"
    done, ref_s = _run(argv, ref, None)
    want = digests(ref)
    run, n, attempts, unloadable = root / f"{name}-killed", 0, 0, []
    while True:  # a kill lands before the reference's end, so the work left shrinks by less than a run per start
        attempts += 1
        done, _ = _run(argv, run, rng.uniform(0.05, 0.6) * ref_s if n < kills else None)
        if done:  # the last start, or one that outran its kill: the command finished either way
            break
        n += 1
        unloadable += loadable(run)
    got = digests(run)
    row = {"kills": n, "starts": attempts, "reference_s": round(ref_s, 1), "files": len(want),
           "equal": got == want, "unloadable": unloadable}
    print(f"{name:>10}: {n} kills, {attempts} starts, {len(want)} result files "
          f"{'all equal' if row['equal'] else 'DIFFER'}, {len(unloadable)} unloadable states", flush=True)
    return row


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
