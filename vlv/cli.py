"""The ``vlv`` command line: thin argparse front ends over the library, one subcommand per job.

User mistakes (bad arguments, missing folders) print one line and exit 2, never a traceback;
set VLV_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def writable_dir(text: str) -> Path:
    """argparse type: a directory we can create and write into."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".vlv-write-probe"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


# ------------------------------------------------------------------------------------------- data
def cmd_data_shapes(args: argparse.Namespace) -> None:
    from vlv.data import write_shapes

    t0 = time.perf_counter()
    write_shapes(args.out, n=args.n, seed=args.seed, split=args.split, progress=not args.quiet)
    print(f"wrote {args.n} {args.split} scenes to {args.out} in {time.perf_counter() - t0:.1f}s")


def cmd_data_sheet(args: argparse.Namespace) -> None:
    from vlv.report import save_contact_sheet

    save_contact_sheet(args.data, args.out, n=args.n, cols=args.cols)
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------- teacher
def cmd_teacher_train(args: argparse.Namespace) -> None:
    from vlv.teacher import TINY, TeacherConfig, TeacherRecipe, train_teacher

    cfg = TINY if args.tiny else TeacherConfig()
    recipe = TeacherRecipe(seed=args.seed)
    for name in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "unet_lr", "eval_every", "eval_n"):
        if getattr(args, name) is not None:
            setattr(recipe, name, getattr(args, name))
    done = train_teacher(args.data, args.out, cfg, recipe, val=args.val, max_minutes=args.minutes)
    print(f"teacher saved to {done}" if done else f"time budget reached; run the same command to resume ({args.out})")


def cmd_teacher_sample(args: argparse.Namespace) -> None:
    from vlv.presets import resolve_decoder

    path = resolve_decoder(args.teacher)  # validate the inputs before the heavy imports
    prompts = [args.prompt] if args.prompt else [
        line.strip() for line in Path(args.captions).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no captions in {args.captions}")
    from vlv.teacher import load_pipeline, sample

    pipe = load_pipeline(path)
    images = sample(pipe, prompts, guidance_scale=args.cfg, steps=args.steps, sampler=args.sampler, seed=args.seed)
    if len(images) == 1 and args.out.suffix:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(args.out / f"{i:06d}.png")
    print(f"wrote {len(images)} image(s) to {args.out}")


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.demo import run_demo

    run_demo(args.out, preset=args.preset, minutes=args.minutes)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from vlv import __version__

    parser = Parser(prog="vlv", description="Vision-Language-Vision auto-encoder.")
    parser.add_argument("--version", action="version", version=f"vlv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="make or inspect image-caption folders")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("shapes", help="render shapes-world scenes into an image-caption folder")
    p.add_argument("--out", type=writable_dir, required=True, help="output folder")
    p.add_argument("--n", type=positive_int, default=10_000, help="number of scenes (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--split", choices=["train", "val", "test"], default="train", help="disjoint scene split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shapes)
    p = data_sub.add_parser("sheet", help="contact sheet of a folder's first images")
    p.add_argument("data", type=Path, help="image-caption folder")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--cols", type=positive_int, default=8)
    p.set_defaults(func=cmd_data_sheet)

    teacher = sub.add_parser("teacher", help="train or sample the shapes text-to-image teacher")
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="TEACHER_COMMAND")
    p = t_sub.add_parser("train", help="train a teacher (resumes when OUT holds a checkpoint)")
    p.add_argument("--data", type=Path, required=True, help="training image-caption folder")
    p.add_argument("--out", type=writable_dir, required=True, help="teacher dir (Stable Diffusion layout)")
    p.add_argument("--val", type=Path, default=None, help="held-out (val split) folder for periodic accuracy")
    p.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--vae-steps", type=positive_int, default=None)
    p.add_argument("--unet-steps", type=positive_int, default=None)
    p.add_argument("--vae-batch", type=positive_int, default=None)
    p.add_argument("--unet-batch", type=positive_int, default=None)
    p.add_argument("--unet-lr", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-n", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny architecture (tests, plumbing)")
    p.set_defaults(func=cmd_teacher_train)
    p = t_sub.add_parser("sample", help="draw images from captions")
    p.add_argument("teacher", help="teacher dir or preset name (shapes-teacher)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one caption")
    g.add_argument("--captions", type=Path, help="text file, one caption a line")
    p.add_argument("--out", type=Path, required=True, help="PNG file (one prompt) or folder")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", choices=["fast", "paper"], default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_teacher_sample)

    p = sub.add_parser("demo", help="the main job on the embedded shapes world")
    p.add_argument("--out", type=writable_dir, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--preset", choices=["default", "quick"], default="default")
    p.add_argument("--minutes", type=float, default=None, help="time budget (default: the preset's)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns on import that torchvision is absent; vlv never uses it (PIL + numpy instead).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("VLV_DEBUG"):
            raise
        print(f"vlv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlv: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
