"""The ``vlv`` command line: thin argparse front ends over the library, one subcommand per job.

User mistakes (bad arguments, inputs, missing folders: :class:`vlv.errors.UserError`) print one line and exit 2;
anything else is a bug and shows its traceback (``vlv --quiet``: one line, exit 1). VLV_DEBUG=1 shows every
traceback. The parser imports no torch (flags come from the config
dataclasses), so ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from vlv.cli.commands import (
    cmd_caption,
    cmd_compose,
    cmd_data_shapes,
    cmd_data_shards,
    cmd_data_sheet,
    cmd_demo,
    cmd_embed,
    cmd_evaluate,
    cmd_import_florence2,
    cmd_import_stage1,
    cmd_import_stage2,
    cmd_precompute,
    cmd_reconstruct,
    cmd_teacher_export,
    cmd_teacher_sample,
    cmd_teacher_train,
    cmd_train_florence2,
    cmd_train_lm,
    cmd_train_stage1,
    cmd_train_stage2,
)
from vlv.cli.flags import (
    add_fields,
    add_parquet_columns,
    add_sampling_args,
    positive_float,
    positive_int,
    recipe_arg,
    writable_dir,
    writable_file,
    writable_path,
)
from vlv.errors import NonFiniteLoss, UserError

# A user's mistake: an input vlv checked (UserError), or a path the system refused; any other error is a bug.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from vlv import __version__
    from vlv.shapes.config import DetectionSettings, TeacherRecipe
    from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig

    parser = Parser(prog="vlv", description="Vision-Language-Vision auto-encoder.")
    parser.add_argument("--version", action="version", version=f"vlv {__version__}")
    parser.add_argument("--quiet", dest="quiet_errors", action="store_true",
                        help="before the command: an unexpected error (a bug) prints one line and exits 1, "
                             "not a traceback")
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
    p.add_argument("--out", type=writable_file, required=True, help="PNG to write")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--cols", type=positive_int, default=8)
    p.set_defaults(func=cmd_data_sheet)
    p = data_sub.add_parser("shards", help="convert a folder, tar shards or parquet into indexed webdataset shards")
    p.add_argument("src", help="image-caption folder, .tar shard(s) (a dir or data/{00000..00009}.tar) or .parquet")
    p.add_argument("--out", type=writable_dir, required=True, help="folder for 00000.tar, ... (holding no .tar)")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="samples per shard (default 10000)")
    add_parquet_columns(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shards)

    teacher = sub.add_parser("teacher", help="train or sample the shapes text-to-image teacher")
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="TEACHER_COMMAND")
    p = t_sub.add_parser("train", help="train a teacher (resumes when OUT holds a checkpoint)")
    p.add_argument("--data", type=Path, required=True, help="training image-caption folder")
    p.add_argument("--out", type=writable_dir, required=True, help="teacher dir (Stable Diffusion layout)")
    p.add_argument("--val", type=Path, default=None, help="held-out (val split) folder for periodic accuracy")
    p.add_argument("--minutes", type=positive_float, default=None, help="stop (resumably) after this long")
    p.add_argument("--tiny", action="store_true", help="tiny architecture (tests, plumbing)")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip",
                   help="an unreadable image: skip it (counted) or stop naming it (default skip)")
    p.add_argument("--resume", choices=["check", "override"], default="check",
                   help="check: a started OUT resumes only with the recipe it was started with (the differing "
                        "fields are named); override: resume with these settings anyway")
    recipe_arg(p, "teacher", "shapes-teacher")
    add_fields(p, TeacherRecipe, "recipe overrides")
    p.set_defaults(func=cmd_teacher_train)
    p = t_sub.add_parser("export", help="export a teacher still training (latest EMA checkpoint) in SD layout")
    p.add_argument("teacher", type=Path, help="teacher dir being trained (holds training/)")
    p.add_argument("--out", type=writable_dir, required=True)
    p.add_argument("--fp16", action="store_true", help="UNet and VAE in fp16 (the text encoder stays fp32)")
    p.set_defaults(func=cmd_teacher_export)
    p = t_sub.add_parser("sample", help="draw images from captions")
    p.add_argument("teacher", help="teacher dir or shipped name (shapes-teacher)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one caption")
    g.add_argument("--captions", type=Path, help="text file, one caption a line")
    p.add_argument("--out", type=writable_path, required=True, help="PNG file (one prompt) or folder")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", choices=["fast", "paper"], default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_teacher_sample)

    train = sub.add_parser("train", help="train a VLV stage")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    def stage(name: str, help_text: str, out_help: str, settings: type, settings_title: str, func,
              val_help: str | None = None, defaults: dict | None = None) -> None:
        """A recipe-driven training command: --out, --recipe, then a flag per field of its settings and loop."""
        p = train_sub.add_parser(name, help=help_text)
        p.add_argument("--out", type=writable_dir, required=True, help=out_help)
        if val_help:
            p.add_argument("--val", type=Path, default=None, help=val_help)
            p.add_argument("--eval-n", type=positive_int, default=200, help="val scenes per evaluation (default 200)")
        recipe_arg(p, name, f"shapes-{name}")
        add_fields(p, settings, f"{settings_title} (recipe section 'settings')", defaults=defaults)
        add_fields(p, TrainConfig, "training loop (recipe section 'train')")
        p.set_defaults(func=func)

    run_dir = "run dir (resumes when it holds a checkpoint)"
    stage("stage1", "distil a frozen diffusion decoder into the VLV encoder (images only)", run_dir, Stage1Settings,
          "inputs and method", cmd_train_stage1, val_help="shapes folder for periodic reconstruction accuracy")
    stage("lm", "pre-train the small shapes language model on caption text", "LM dir (transformers layout)",
          LMSettings, "inputs", cmd_train_lm)
    stage("florence2", "pre-train the small shapes Florence-2 on object detection (<OD>)",
          "Florence-2 dir (transformers' native layout)", DetectionSettings, "inputs", cmd_train_florence2)
    stage("stage2", "teach a causal LM to read stage-1 embeddings out as captions", run_dir, Stage2Settings,
          "inputs and method", cmd_train_stage2, val_help="shapes folder for periodic caption accuracy",
          defaults={"decoder": "shapes-teacher"})

    pre = sub.add_parser("precompute", help="cache what stage 1 keeps frozen, once, for any number of runs")
    pre_sub = pre.add_subparsers(dest="precompute_command", required=True, metavar="WHAT")
    for what, help_text in (("latents", "the VAE's posteriors (mean, std) per image, fp16"),
                            ("vision", "the frozen vision tower's features per image, fp16 (frozen towers only)")):
        p = pre_sub.add_parser(what, help=help_text + "; sharded, resumable, split over torchrun/accelerate ranks")
        p.add_argument("--decoder", required=True, help="Stable Diffusion dir or shipped name: the stage-1 "
                       "run's decoder (its VAE%s and resolution)" % ("" if what == "latents" else " is not run"))
        if what == "vision":
            p.add_argument("--encoder", required=True, help="stage-1 run dir, named encoder config or local "
                           "Florence-2 dir, as vlv train stage1 --encoder / --init take")
            p.add_argument("--trainable", choices=["config", "official", "all"], default="config",
                           help="the stage-1 run's --trainable for a named encoder (default config)")
            p.add_argument("--seed", type=int, default=0, help="the stage-1 run's seed (a random-init tower's "
                           "weights follow it; default 0)")
        p.add_argument("--data", required=True, help="image folder, tar shards or parquet, as --data of training")
        add_parquet_columns(p)
        p.add_argument("--out", type=writable_dir, required=True, help="cache dir (a re-run finishes it)")
        p.add_argument("--image-size", type=positive_int, default=None, help="data resolution (default: the "
                       "decoder's, as in training)")
        p.add_argument("--batch-size", type=positive_int, default=128 if what == "latents" else 32)
        p.add_argument("--shard-rows", type=positive_int, default=4096, help="samples per shard (default 4096)")
        p.add_argument("--num-workers", type=int, default=2, help="decoding workers (default 2)")
        p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip",
                       help="an unreadable image: an empty row (skipped in training) or stop (default skip)")
        p.add_argument("--precision", choices=["no", "bf16"], default="no",
                       help="autocast of the vision tower, as the stage-1 run's --precision (default no)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_precompute, what=what)

    p = sub.add_parser("caption", help="caption images with a stage-2 run (one JSON line per image)")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--model", default="shapes-stage2", help="stage-2 run dir or shipped name (default shapes-stage2)")
    p.add_argument("--out", type=writable_file, required=True, help="captions.jsonl to write")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--num-beams", type=positive_int, default=None, help="default: the run's")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the run's")
    p.add_argument("--postprocess", choices=["official", "none"], default=None,
                   help="caption clean-up: official (cut after the last '.', drop repeated sentences: the official "
                        "Caption_inference.process_caption) or none (default: the run's)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (counted) instead of "
                   "stopping at the first")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("reconstruct", help="redraw images from their VLV embeddings through the decoder")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or shipped name (shapes-teacher)")
    p.add_argument("--out", type=writable_dir, required=True, help="output folder (file names kept)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_sampling_args(p)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (counted) instead of "
                   "stopping at the first")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("embed", help="the caption embeddings z of images (optionally T(z)), as safetensors")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", default=None, help="Stable Diffusion dir or shipped name: also write T(z) "
                   "(its text encoder's output)")
    p.add_argument("--out", type=writable_file, required=True, help="safetensors file: z (N, Nq, d_T) [and T_z], the "
                   "image paths in its metadata")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (counted) instead of "
                   "stopping at the first")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("compose", help="one image from the first k embeddings of two images (paper Fig. 6)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or shipped name (shapes-teacher)")
    p.add_argument("--k", type=positive_int, default=None, help="embeddings kept from each (default Nq/2)")
    p.add_argument("--out", type=writable_file, required=True, help="PNG to write")
    add_sampling_args(p)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (counted) instead of "
                   "stopping at the first")
    p.set_defaults(func=cmd_compose)

    imp = sub.add_parser("import-official", help="import checkpoints of the official VLV code into vlv's dirs")
    imp_sub = imp.add_subparsers(dest="import_command", required=True, metavar="WHAT")
    p = imp_sub.add_parser("florence2", help="a remote-code Florence-2 dir -> a native transformers Florence-2 dir")
    p.add_argument("src", type=Path, help="Florence-2 dir in the remote-code layout (config.json with auto_map)")
    p.add_argument("--out", type=writable_dir, required=True, help="native Florence-2 dir to write (absent or empty)")
    p.set_defaults(func=cmd_import_florence2)
    p = imp_sub.add_parser("stage1", help="an official stage-1 checkpoint -> a vlv stage-1 run dir")
    p.add_argument("ckpt", type=Path, help="checkpoint_<N>.pt, a consolidated pytorch_model.bin, or a DeepSpeed "
                                           "save dir holding one")
    p.add_argument("--florence2", type=Path, required=True,
                   help="the base Florence-2 dir (remote-code layout, converted into RUN/florence2; or native)")
    p.add_argument("--decoder", type=Path, required=True, help="the base Stable Diffusion dir of the official run")
    p.add_argument("--out", type=writable_dir, required=True, help="run dir to write (absent or empty)")
    p.set_defaults(func=cmd_import_stage1)
    p = imp_sub.add_parser("stage2", help="an official stage-2 model.pt (CLIPDecoder) -> a vlv stage-2 run dir")
    p.add_argument("model_pt", type=Path, help="model.pt of the official stage 2 (a CLIPDecoder state dict)")
    p.add_argument("--florence2", type=Path, required=True,
                   help="the base Florence-2 dir (remote-code layout, converted into RUN/encoder/florence2; or native)")
    p.add_argument("--decoder", type=Path, required=True,
                   help="the base Stable Diffusion dir of the official run (its text encoder is T)")
    p.add_argument("--lm", type=Path, required=True,
                   help="the base LLM dir of the official run (Qwen2.5-3B: architecture and tokenizer)")
    p.add_argument("--out", type=writable_dir, required=True, help="run dir to write (absent or empty)")
    p.set_defaults(func=cmd_import_stage2)

    p = sub.add_parser("demo", help="the main job on the embedded shapes world")
    p.add_argument("--out", type=writable_dir, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--recipe", "--preset", default="default",
                   help="demo recipe: default (vlv/recipes/demo.json), quick (demo-quick.json: seconds, plumbing), "
                        "another name or a JSON file")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="whole-run time target; training fills what data and evaluation leave (default: the "
                        "recipe's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="re-measure a demo run dir: metrics.json and report.html")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--n", type=positive_int, default=500, help="scenes to measure (default 500)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale for teacher and reconstruction")
    p.add_argument("--num-beams", type=positive_int, default=1, help="caption beams (default 1: greedy)")
    p.set_defaults(func=cmd_evaluate)
    return parser
def _drop_torchvision_notice() -> None:
    """transformers warns, once per image-processor class, that torchvision is absent and it falls back to PIL:
    vlv preprocesses with PIL + numpy and never uses either. Only that record is dropped; every other transformers
    warning (weights not initialised, ...) still shows."""
    import logging

    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    _drop_torchvision_notice()
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("VLV_DEBUG"))  # every error raises, with its traceback
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("vlv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, USER_ERRORS):  # the user's input: what is wrong with it, in one line
            status, text = 2, f"vlv: error: {one_line(e)}"
        elif isinstance(e, NonFiniteLoss):
            status, text = 1, f"vlv: error: {e}"
        elif args.quiet_errors:
            status, text = 1, (f"vlv: internal error: {type(e).__name__}: {one_line(e)} (run without --quiet for "
                               "the traceback)")
        else:  # a bug: its traceback is what a report needs
            status, text = 1, "".join(traceback.format_exception(e)).rstrip()
        _release(e)
        print(text, file=sys.stderr)
        return status
    return 0


def _release(error: BaseException) -> None:
    """Free what the error's traceback holds, now: a DataLoader iterator caught in it keeps its workers, which
    ignore SIGTERM (they leave a stop to the trainer), so the exit would wait on them forever. Progress bars
    freed with it close before the message is printed."""
    import gc

    error.__traceback__ = None
    gc.collect()


def one_line(error: BaseException) -> str:
    """The message itself: a DataLoader worker's error arrives wrapped in its worker's traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines) or type(error).__name__
