"""Shapes stage 1: held-out reconstruction accuracy against training steps, per recipe and seed.

    python benchmarks/stage1_curves.py --recipes shapes shapes-scratch --seeds 0 1 2 \
        --steps 1200 --eval-every 300 --n 500 --out benchmarks/results/stage1_curves.json

Each run trains the recipe (its steps overridden by --steps; a shorter run keeps the recipe's warm-up) against
the shipped shapes teacher on 10,000 training scenes and measures reconstruction scene accuracy on --n test
scenes (fast sampler, CFG 2) every --eval-every steps. Reported per run: the curve, wall time and the process's
CPU time spent training (evaluations excluded). Step time with and without cached vision features:
``benchmarks/stage1.py speed``.
A finished run dir under --work is re-used (delete it to re-train); the JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from common import train_config, write_result  # benchmarks/


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(recipe_name: str, seed: int, args: argparse.Namespace, data: Path, test: Path) -> dict:
    from vlv.shapes.metrics import stage1_evaluator
    from vlv.training.recipes import load_recipe, resolved, section
    from vlv.training.stage1 import Stage1Settings, train_stage1

    recipe = load_recipe(recipe_name, "stage1")
    cfg = train_config(recipe, {"steps": args.steps, "seed": seed, "eval_every": args.eval_every,
                                "progress": False, "batch_size": args.batch_size})
    settings = section(recipe, "settings", Stage1Settings, decoder="shapes-teacher", data=str(data))
    run = Path(args.work) / f"{recipe_name}-seed{seed}"
    evaluate = stage1_evaluator(test, args.n)
    eval_s = [0.0]

    def timed_eval(encoder, decoder):
        t = cpu_seconds()
        out = evaluate(encoder, decoder)
        eval_s[0] += cpu_seconds() - t
        return out

    t0, c0 = time.perf_counter(), cpu_seconds()
    train_stage1(settings, cfg, run, progress=False, evaluator=timed_eval,
                 recipe=resolved(recipe, train=cfg, settings=settings))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0 - eval_s[0]
    history = json.loads((run / "checkpoint" / "trainer.json").read_text())["history"]
    curve = [[h["eval"]["step"], h["eval"]["recon_scene_accuracy"]] for h in history if "eval" in h]
    train_s = next(h["elapsed_s"] for h in reversed(history) if "elapsed_s" in h)
    print(f"{recipe_name} seed {seed}: {curve} | loop {train_s / 60:.1f} min wall incl. evals, "
          f"{cpu / 60:.1f} CPU-min training (caches included, evals excluded), {wall / 60:.1f} min in all", flush=True)
    return {"recipe": recipe_name, "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size, "curve": curve,
            "cpu_minutes_training": round(cpu / 60, 2), "cpu_minutes_eval": round(eval_s[0] / 60, 2),
            "wall_minutes": round(wall / 60, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["shapes", "shapes-scratch"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="default: each recipe's")
    p.add_argument("--batch-size", type=int, default=None, help="default: each recipe's")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--n", type=int, default=500, help="test scenes per evaluation")
    p.add_argument("--train-n", type=int, default=10_000)
    p.add_argument("--work", default="runs/stage1-curves", help="run dirs and data")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    from vlv.shapes.data import write_shapes

    work = Path(args.work)
    data, test = work / "data" / "train", work / "data" / "test"
    for folder, n, split in ((data, args.train_n, "train"), (test, args.n, "test")):
        if not (folder / "dataset.json").is_file():
            write_shapes(folder, n=n, seed=0, split=split, progress=False)
    results = []
    for name in args.recipes:
        for seed in args.seeds:
            results.append(run_one(name, seed, args, data, test))
            write_result(args.out, {"n": args.n, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
