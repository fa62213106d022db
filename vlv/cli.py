"""The ``vlv`` command line: thin argparse front ends over the library, one subcommand per job.

User mistakes (bad arguments, missing folders) print one line and exit 2, never a traceback;
set VLV_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal

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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------- flags from config dataclasses
def _none_or(parse):
    def parse_optional(text: str):
        return None if text.lower() == "none" else parse(text)
    return parse_optional


def _number(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    return parse


def _field_kwargs(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: numbers, strings, choices (Literal), tuples, optionals, bools."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is Literal:
        return {"choices": list(args)}
    if typing.get_origin(hint) is tuple:
        return {"type": _number(args[0]), "nargs": "+" if args[-1] is Ellipsis else len(args)}
    parse = _number(hint) if hint in (int, float) else str
    return {"type": _none_or(parse) if optional else parse}


def add_fields(p: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (),
               defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of the config dataclass ``cls``, its help from the field's metadata.

    Fields without a default are required flags (unless ``defaults`` gives one); the others default to None,
    meaning "the recipe's value", so a flag overrides a single field of the recipe.
    """
    hints = typing.get_type_hints(cls)
    group = p.add_argument_group(title)
    for f in fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        kwargs = _field_kwargs(hints[f.name])
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        required = f.default is MISSING and f.default_factory is MISSING and f.name not in (defaults or {})
        help_text = f.metadata.get("help", "")
        if not required:
            known = (defaults or {}).get(f.name)
            help_text += f" (default {known})" if known is not None else " (default: the recipe's)"
        group.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, required=required,
                           default=(defaults or {}).get(f.name), help=help_text, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` set on the command line (None: not given)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def _recipe_arg(p: argparse.ArgumentParser, task: str, default: str) -> None:
    p.add_argument("--recipe", default=default, help=f"named recipe (vlv/recipes/*.json, task {task}) or a JSON "
                   f"file: how this stage trains; the flags below override single fields (default {default})")


def _command() -> str:
    return "vlv " + " ".join(sys.argv[1:])


# ------------------------------------------------------------------------------------------- data
def cmd_data_shapes(args: argparse.Namespace) -> None:
    from vlv.shapes.data import write_shapes

    t0 = time.perf_counter()
    write_shapes(args.out, n=args.n, seed=args.seed, split=args.split, progress=not args.quiet)
    print(f"wrote {args.n} {args.split} scenes to {args.out} in {time.perf_counter() - t0:.1f}s")


def cmd_data_sheet(args: argparse.Namespace) -> None:
    from vlv.shapes.report import save_contact_sheet

    save_contact_sheet(args.data, args.out, n=args.n, cols=args.cols)
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------- teacher
def cmd_teacher_train(args: argparse.Namespace) -> None:
    from vlv.shapes.config import TINY, TeacherConfig, TeacherRecipe
    from vlv.shapes.teacher import train_teacher
    from vlv.training.recipes import load_recipe, section

    _require_dirs(args.data, args.val)
    recipe = section(load_recipe(args.recipe, "teacher"), "settings", TeacherRecipe, given(args, TeacherRecipe))
    done = train_teacher(args.data, args.out, TINY if args.tiny else TeacherConfig(), recipe, val=args.val,
                         max_minutes=args.minutes, command=_command())
    print(f"teacher saved to {done}" if done else f"time budget reached; run the same command to resume ({args.out})")


def cmd_teacher_export(args: argparse.Namespace) -> None:
    import torch

    from vlv.shapes.teacher import export_checkpoint

    export_checkpoint(args.teacher, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"exported to {args.out}")


def cmd_teacher_sample(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    path = resolve_decoder(args.teacher)  # validate the inputs before the heavy imports
    prompts = [args.prompt] if args.prompt else [
        line.strip() for line in Path(args.captions).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no captions in {args.captions}")
    from vlv.diffusion import load_pipeline, sample

    images = sample(load_pipeline(path), prompts, guidance_scale=args.cfg, steps=args.steps, sampler=args.sampler,
                    seed=args.seed)
    if len(images) == 1 and args.out.suffix:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(args.out / f"{i:06d}.png")
    print(f"wrote {len(images)} image(s) to {args.out}")


# ---------------------------------------------------------------------------------------- stage 1
def cmd_train_stage1(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)  # fail fast, before the heavy imports
    if args.init:
        resolve_encoder(args.init)
    _require_dirs(args.data, args.val)
    if args.init and args.phi_init_gain is not None:
        raise ValueError(f"--phi-init-gain scales phi's freshly initialised weights, but --init {args.init}"
                         " overwrites them with trained ones; pass one or the other")
    from vlv.training.loop import TrainConfig
    from vlv.training.recipes import load_recipe, resolved, section
    from vlv.training.stage1 import Stage1Settings, check_settings, train_stage1

    recipe = load_recipe(args.recipe, "stage1")
    settings = section(recipe, "settings", Stage1Settings, given(args, Stage1Settings))
    check_settings(settings)
    train = given(args, TrainConfig)
    if args.budget_minutes:
        train["steps"] = 10**9  # a budgeted run plans its own count after a few steps
    cfg = section(recipe, "train", TrainConfig, train)
    evaluator = None
    if args.val:
        from vlv.shapes.metrics import stage1_evaluator

        evaluator = stage1_evaluator(args.val, args.eval_n)
    done = train_stage1(settings, cfg, args.out, evaluator=evaluator, recipe=resolved(recipe, train=cfg))
    print(f"encoder saved to {args.out}" if done else f"stopped early; run the same command to resume ({args.out})")


def _load_encoder_decoder(args: argparse.Namespace):
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder), resolve_encoder(args.encoder)  # fail fast, before the heavy imports
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder

    return VLVEncoder.from_pretrained(args.encoder).eval(), DiffusionDecoder.from_pretrained(args.decoder)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    import numpy as np
    from tqdm.auto import tqdm

    from vlv.data import list_images, load_image, to_pil, to_tensor
    from vlv.inference import reconstruct_images

    paths = list_images(args.images)
    encoder, decoder = _load_encoder_decoder(args)
    size = decoder.image_size
    args.out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reconstruct", unit="batch"):
        chunk = paths[start : start + args.batch_size]
        x = to_tensor(np.stack([load_image(p, size) for p in chunk]))
        recon = reconstruct_images(encoder, decoder, x, sampler=args.sampler, guidance_scale=args.cfg,
                                   steps=args.steps, batch_size=args.batch_size, seed=args.seed + start)
        for p, im in zip(chunk, to_pil(recon), strict=True):
            im.save(args.out / (p.stem + ".png"))
    print(f"wrote {len(paths)} reconstruction(s) to {args.out}")


def cmd_compose(args: argparse.Namespace) -> None:
    import numpy as np

    from vlv.data import load_image, to_pil, to_tensor
    from vlv.inference import compose_images

    for p in (args.a, args.b):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such image: {p}")
    encoder, decoder = _load_encoder_decoder(args)
    size = decoder.image_size
    k = args.k or encoder.config.num_queries // 2
    a, b = (to_tensor(np.stack([load_image(p, size)])) for p in (args.a, args.b))
    image = compose_images(encoder, decoder, a, b, k, sampler=args.sampler, guidance_scale=args.cfg,
                           steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image)[0].save(args.out)
    print(f"wrote {args.out} (first {k} embeddings of each image)")


# ---------------------------------------------------------------------------------------- stage 2
def _require_dirs(*folders) -> None:
    for folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")


def _tokenizer_for(lm: str):
    """A random-init LM config has no tokenizer: the command line's LMs are the shapes world's."""
    from vlv.lm import is_lm_dir

    if is_lm_dir(lm):
        return None
    from vlv.shapes.tokenizers import build_shapes_tokenizer

    return build_shapes_tokenizer()


def cmd_train_lm(args: argparse.Namespace) -> None:
    _require_dirs(args.data, args.val)
    from vlv.training.lm import LMSettings, train_lm
    from vlv.training.loop import TrainConfig
    from vlv.training.recipes import load_recipe, section

    recipe = load_recipe(args.recipe, "lm")
    settings = section(recipe, "settings", LMSettings, given(args, LMSettings))
    cfg = section(recipe, "train", TrainConfig, given(args, TrainConfig))
    judge = None
    if settings.val:
        from vlv.shapes.metrics import lm_judge as judge
    done = train_lm(settings, cfg, args.out, tokenizer=_tokenizer_for(settings.lm), judge=judge)
    print(f"language model saved to {args.out}" if done else f"stopped early; run again to resume ({args.out})")


def cmd_train_stage2(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)
    _require_dirs(args.data, args.val)
    resolve_encoder(args.encoder)
    from vlv.training.loop import TrainConfig
    from vlv.training.recipes import load_recipe, resolved, section
    from vlv.training.stage2 import Stage2Settings, train_stage2

    recipe = load_recipe(args.recipe, "stage2")
    settings = section(recipe, "settings", Stage2Settings, given(args, Stage2Settings))
    cfg = section(recipe, "train", TrainConfig, given(args, TrainConfig))
    evaluator = None
    if args.val:
        from vlv.shapes.metrics import stage2_evaluator

        evaluator = stage2_evaluator(args.val, args.eval_n)
    done = train_stage2(settings, cfg, args.out, evaluator=evaluator, tokenizer=_tokenizer_for(settings.lm),
                        recipe=resolved(recipe, train=cfg))
    print(f"captioner saved to {args.out}" if done else f"stopped early; run again to resume ({args.out})")


def cmd_caption(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    from tqdm.auto import tqdm

    from vlv.data import list_images, load_image, to_tensor
    from vlv.modeling import atomic_write_text
    from vlv.shipped import resolve_stage2

    paths = list_images(args.images)
    resolve_stage2(args.model)  # fail fast, before the heavy imports
    from vlv.captioner import Captioner
    from vlv.inference import caption_images

    captioner = Captioner.from_pretrained(args.model).eval()
    size = captioner.encoder.config.image_size
    if args.max_new_tokens:
        captioner.config.max_new_tokens = args.max_new_tokens
    rows = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="caption", unit="batch"):
        chunk = paths[start : start + args.batch_size]
        x = to_tensor(np.stack([load_image(p, size) for p in chunk]))
        caps = caption_images(captioner, x, batch_size=args.batch_size, num_beams=args.num_beams)
        rows += [{"image": p.name, "caption": c} for p, c in zip(chunk, caps, strict=True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} caption(s) to {args.out}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["fast", "paper"], default="fast",
                   help="fast: DPM-Solver++ 20 steps; paper: DDPM 50 steps")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (paper: 2.0)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the sampler's)")
    p.add_argument("--seed", type=int, default=0)


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    run_demo(args.out, recipe=args.recipe, minutes=args.minutes)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if not (args.run / "teacher" / "model_index.json").is_file():
        raise FileNotFoundError(f"{args.run} is not a VLV run dir (no teacher/model_index.json)")
    from vlv.shapes.evaluate import EvalSettings, evaluate_run
    from vlv.shapes.report import build_report

    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    evaluate_run(args.run, settings)
    print(f"wrote {args.run / 'metrics.json'} and {build_report(args.run)}")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from vlv import __version__
    from vlv.shapes.config import TeacherRecipe
    from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig

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
    p.add_argument("--minutes", type=positive_float, default=None, help="stop (resumably) after this long")
    p.add_argument("--tiny", action="store_true", help="tiny architecture (tests, plumbing)")
    _recipe_arg(p, "teacher", "shapes-teacher")
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
    p.add_argument("--out", type=Path, required=True, help="PNG file (one prompt) or folder")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", choices=["fast", "paper"], default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_teacher_sample)

    train = sub.add_parser("train", help="train a VLV stage")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    p = train_sub.add_parser("stage1", help="distil a frozen diffusion decoder into the VLV encoder (images only)")
    p.add_argument("--out", type=writable_dir, required=True, help="run dir (resumes when it holds a checkpoint)")
    p.add_argument("--val", type=Path, default=None, help="shapes folder for periodic reconstruction accuracy")
    p.add_argument("--eval-n", type=positive_int, default=200, help="val scenes per evaluation (default 200)")
    _recipe_arg(p, "stage1", "shapes-stage1")
    add_fields(p, Stage1Settings, "inputs and method (recipe section 'settings')")
    add_fields(p, TrainConfig, "training loop (recipe section 'train')")
    p.set_defaults(func=cmd_train_stage1)

    p = train_sub.add_parser("lm", help="pre-train the small shapes language model on caption text")
    p.add_argument("--out", type=writable_dir, required=True, help="LM dir (transformers layout)")
    _recipe_arg(p, "lm", "shapes-lm")
    add_fields(p, LMSettings, "inputs (recipe section 'settings')")
    add_fields(p, TrainConfig, "training loop (recipe section 'train')")
    p.set_defaults(func=cmd_train_lm)

    p = train_sub.add_parser("stage2", help="teach a causal LM to read stage-1 embeddings out as captions")
    p.add_argument("--out", type=writable_dir, required=True, help="run dir (resumes when it holds a checkpoint)")
    p.add_argument("--val", type=Path, default=None, help="shapes folder for periodic caption accuracy")
    p.add_argument("--eval-n", type=positive_int, default=200, help="val scenes per evaluation (default 200)")
    _recipe_arg(p, "stage2", "shapes-stage2")
    add_fields(p, Stage2Settings, "inputs and method (recipe section 'settings')",
               defaults={"decoder": "shapes-teacher"})
    add_fields(p, TrainConfig, "training loop (recipe section 'train')")
    p.set_defaults(func=cmd_train_stage2)

    p = sub.add_parser("caption", help="caption images with a stage-2 run (one JSON line per image)")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--model", default="shapes-stage2", help="stage-2 run dir or shipped name (default shapes-stage2)")
    p.add_argument("--out", type=Path, required=True, help="captions.jsonl to write")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--num-beams", type=positive_int, default=None, help="default: the run's")
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("reconstruct", help="redraw images from their VLV embeddings through the decoder")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or shipped name (shapes-teacher)")
    p.add_argument("--out", type=writable_dir, required=True, help="output folder (file names kept)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("compose", help="one image from the first k embeddings of two images (paper Fig. 6)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or shipped name (shapes-teacher)")
    p.add_argument("--k", type=positive_int, default=None, help="embeddings kept from each (default Nq/2)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_compose)

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

