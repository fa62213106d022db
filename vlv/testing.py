"""Test helpers shipped with the package (as ``torch.testing`` and accelerate's ``test_utils`` are), for the
suite and the benchmarks alike.

Kill soak: a ``vlv`` command SIGKILLed at random moments and resumed ends where an uninterrupted run does.

:func:`soak` runs the command once to the end (the reference), then starts it again and again in another dir,
SIGKILLing its process group after a random delay (uniform over 0.05-0.6 of the reference's wall time, so kills
land in start-up, in steps and in checkpoint writes) until ``kills`` kills have happened, then once more to the
end. A start that finishes before its kill ends the soak early, with fewer kills (reported). After every kill the
run dir must be loadable (:func:`loadable`: any checkpoint's trainer.json parses and its safetensors read; a
cache's finished shards read), and at the end every safetensors file outside checkpoints must equal the
reference's, tensor bytes and metadata (:func:`digests`).

Used by ``benchmarks/kill_soak.py`` (every training command, 10 kills each) and by the tests (one command, a few
kills). It runs the command line from outside, as a user or a scheduler does: ``python -m vlv.cli``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open


def run(argv: list[str], out: Path, kill_after: float | None) -> tuple[bool, float]:
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
    """The soak of ``vlv argv`` in ``root/{name}-ref`` and ``root/{name}-killed``: kills, starts, the reference's
    seconds, its result files, whether they all came out equal, and every unloadable state seen after a kill."""
    ref = root / f"{name}-ref"
    done, ref_s = run(argv, ref, None)
    want = digests(ref)
    out, n, attempts, unloadable = root / f"{name}-killed", 0, 0, []
    while True:  # a kill lands before the reference's end, so the work left shrinks by less than a run per start
        attempts += 1
        done, _ = run(argv, out, rng.uniform(0.05, 0.6) * ref_s if n < kills else None)
        if done:  # the last start, or one that outran its kill: the command finished either way
            break
        n += 1
        unloadable += loadable(out)
    got = digests(out)
    row = {"kills": n, "starts": attempts, "reference_s": round(ref_s, 1), "files": len(want),
           "equal": got == want, "unloadable": unloadable}
    print(f"{name:>10}: {n} kills, {attempts} starts, {len(want)} result files "
          f"{'all equal' if row['equal'] else 'DIFFER'}, {len(unloadable)} unloadable states", flush=True)
    return row
