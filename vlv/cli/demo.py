"""``vlv demo``: the main job on the embedded shapes world (``vlv evaluate shapes`` re-measures its run dir)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import positive_float, shown, writable_dir


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
                        "recipe's fixed step counts)")
    p.add_argument("--teacher", default=None,
                   help="the teacher to distil: shapes-teacher (the UNet), shapes-teacher-sd3 (the SD3-layout "
                        f"transformer) or a diffusers dir (default: {recipe.get('teacher', 'shapes-teacher')} from "
                        f"recipe {recipe['name']})")
    # Its old spelling, hidden: train's --minutes is a stop time, not a budget (train's budget is --budget-minutes).
    p.add_argument("--minutes", dest="minutes", type=positive_float, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    run_demo(args.out, recipe=args.recipe, minutes=args.minutes, teacher=args.teacher)
