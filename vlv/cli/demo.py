"""``vlv demo`` and ``vlv evaluate``: the main job on the embedded shapes world, and its measurement."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import positive_float, positive_int, shown, writable_dir


def register(sub: argparse._SubParsersAction) -> None:
    from vlv.training.recipes import load_recipe

    recipe = load_recipe("default", "demo")
    p = sub.add_parser("demo", help="the main job on the embedded shapes world")
    p.add_argument("--out", type=writable_dir, default=Path("runs/demo"), help="run folder")
    p.add_argument("--recipe", "--preset", default="default",
                   help="demo recipe: default (vlv/recipes/demo/default.json), quick (demo/quick.json: seconds, "
                        "plumbing), another name of vlv/recipes/demo/ or a JSON file (default: default)")
    p.add_argument("--budget-minutes", dest="minutes", type=positive_float, default=None,
                   help="whole-run time budget: each stage's steps are planned to fill its share of what data and "
                        f"evaluation leave (default: {shown(recipe.get('minutes'))} from recipe {recipe['name']}: the "
                        "recipe's step counts, the same numbers on any machine)")
    # Its old spelling, hidden: train's --minutes is a stop time, not a budget (train's budget is --budget-minutes).
    p.add_argument("--minutes", dest="minutes", type=positive_float, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="re-measure a demo run dir: metrics.json and report.html")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--n", type=positive_int, default=500, help="scenes to measure (default 500)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale for teacher and reconstruction")
    p.add_argument("--num-beams", type=positive_int, default=1, help="caption beams (default 1: greedy)")
    p.set_defaults(func=cmd_evaluate)


def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    run_demo(args.out, recipe=args.recipe, minutes=args.minutes)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from vlv.shapes.evaluate import EvalSettings, evaluate_run
    from vlv.shapes.report import build_report

    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    evaluate_run(args.run, settings)
    print(f"wrote {args.run / 'metrics.json'} and {build_report(args.run)}")
