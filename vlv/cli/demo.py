"""``vlv demo``: the main job on the embedded shapes world (``vlv evaluate shapes`` re-measures its run dir)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import positive_float, writable_dir


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


def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    run_demo(args.out, recipe=args.recipe, minutes=args.minutes)
