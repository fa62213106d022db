"""``vlv demo`` and ``vlv evaluate``: the main job on the embedded shapes world, and its measurement."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import positive_float, positive_int, writable_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded shapes world")
    p.add_argument("--out", type=writable_dir, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--recipe", "--preset", default="default",
                   help="demo recipe: default (vlv/recipes/demo/default.json), quick (demo/quick.json: seconds, "
                        "plumbing), another name of vlv/recipes/demo/ or a JSON file")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="whole-run time target; training fills what data and evaluation leave (default: the "
                        "recipe's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="re-measure a demo run dir: metrics.json, report/ and report.html")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="folder for metrics.json, report/ and report.html (default: the run folder)")
    p.add_argument("--force", action="store_true",
                   help="replace an evaluation of more scenes already in --out (default: refuse, keeping it)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--n", type=positive_int, default=500, help="scenes to measure (default 500)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale for teacher and reconstruction")
    p.add_argument("--num-beams", type=positive_int, default=1, help="caption beams (default 1: greedy)")
    p.set_defaults(func=cmd_evaluate)


def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    run_demo(args.out, recipe=args.recipe, minutes=args.minutes)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from vlv.shapes.evaluate import EvalSettings, evaluate_run, headline
    from vlv.shapes.report import build_report

    out = args.out or args.run
    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    metrics = evaluate_run(args.run, settings, out=out, force=args.force)
    print(headline(metrics))
    print(f"wrote {out / 'metrics.json'} and {build_report(out)}")
