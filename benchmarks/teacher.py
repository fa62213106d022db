"""Benchmark a shapes teacher: samples from true test captions read back by the detector.

    python benchmarks/teacher.py --teacher shapes-teacher --n 500
    python benchmarks/teacher.py --teacher runs/teacher-v1 --n 500 --cfg 1 1.5 2 3 4 --json metrics.json

Prints scene accuracy / object F1 per CFG scale (DPM-Solver++ 20 steps unless --steps), the VAE's own
reconstruction accuracy, the training record (wall time, accuracy-vs-time curve), and writes a PNG grid
(true render | sample) for the first test scenes. An SD3-layout teacher (``vlv teacher train --layout sd3``) is
sampled through the stock StableDiffusion3Pipeline with its own FlowMatchEuler scheduler (28 steps unless --steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import test_scenes, write_result  # benchmarks/
from PIL import Image

from vlv.diffusion import load_pipeline, sample
from vlv.shapes import teacher_sd3
from vlv.shapes.metrics import image_scores, vae_accuracy
from vlv.shapes.report import contact_sheet
from vlv.shipped import resolve_decoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="shapes-teacher", help="teacher dir or shipped name")
    p.add_argument("--n", type=int, default=500, help="test-split scenes")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--steps", type=int, default=None, help="default: 20 (SD layout), 28 (SD3 layout)")
    p.add_argument("--sampler", choices=["fast", "paper"], default="fast", help="SD layout only")
    p.add_argument("--grid", type=Path, default=Path("runs/benchmarks/teacher_grid.png"))
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    path = resolve_decoder(args.teacher)  # a shipped name or a dir, of either layout
    if teacher_sd3.is_sd3_dir(path):
        pipe, steps = teacher_sd3.load_pipeline(path), args.steps or teacher_sd3.DEFAULT_STEPS
        denoiser, sampler = pipe.transformer, "flow-match-euler"

        def draw(captions: list[str], g: float) -> list:
            return teacher_sd3.sample(pipe, captions, guidance_scale=g, steps=steps)
    else:
        pipe, steps, sampler = load_pipeline(path), args.steps or 20, args.sampler
        denoiser = pipe.unet

        def draw(captions: list[str], g: float) -> list:
            return sample(pipe, captions, guidance_scale=g, steps=steps, sampler=sampler)
    size = denoiser.config.sample_size * pipe.vae_scale_factor  # the resolution the teacher draws at
    test = test_scenes(args.n, size)
    captions = test.captions
    result: dict = {"teacher": str(path), "n": args.n, "sampler": sampler, "steps": steps}

    t0 = time.perf_counter()
    result["vae_scene_accuracy"] = vae_accuracy(pipe.vae, test)
    print(f"VAE reconstruction scene accuracy: {result['vae_scene_accuracy']:.4f} ({time.perf_counter() - t0:.1f}s)")

    best, best_images = None, None
    result["cfg"] = {}
    print(f"{'cfg':>5} {'scene acc':>10} {'object F1':>10} {'attr acc':>9} {'s':>7}")
    for g in args.cfg:
        t0 = time.perf_counter()
        images = draw(captions, g)
        s = image_scores(images, test)
        dt = time.perf_counter() - t0
        result["cfg"][str(g)] = {**s.as_dict(), "seconds": round(dt, 1)}
        print(f"{g:5.1f} {s.scene_accuracy:10.4f} {s.object_f1:10.4f} {s.attribute_accuracy:9.4f} {dt:7.1f}")
        if best is None or s.scene_accuracy > result["cfg"][str(best)]["scene_accuracy"]:
            best, best_images = g, images
    result["best_cfg"] = best
    if "2.0" in result["cfg"]:  # the footing every report measures on (the paper's reconstruction CFG)
        result["teacher"] = result["cfg"]["2.0"]
    print(f"best: cfg {best}, scene accuracy {result['cfg'][str(best)]['scene_accuracy']:.4f}")

    record_file = path / "teacher.json"
    record = json.loads(record_file.read_text()).get("training", {}) if record_file.exists() else {}
    if record:
        result["training_wall_s"] = {k[: -len("_wall_s")]: v for k, v in record.items() if k.endswith("_wall_s")}
        print("training wall time (s): " + json.dumps(result["training_wall_s"]))
        print("accuracy against training time (val split, during training):")
        for phase in record.get("history", {}):
            for row in record.get("history", {}).get(phase, []):
                if "eval" in row:
                    e = row["eval"]
                    accs = {k: v for k, v in e.items() if "accuracy" in k}
                    print(f"  {phase:4s} step {e['step']:6d}  {e['elapsed_s'] / 60:7.1f} min  {json.dumps(accs)}")

    truth_images = [Image.fromarray(a) for a in test.images[:32]]
    pairs = [im for pair in zip(truth_images, best_images[:32], strict=True) for im in pair]
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(pairs, cols=16).save(args.grid)
    print(f"grid (true | sample at cfg {best}): {args.grid}")
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
