"""``vlv train ...`` and ``vlv teacher ...``: each command parses its recipe and flags into settings and calls the
library, which checks every input before anything loads."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from pathlib import Path

from vlv.cli.flags import (
    add_fields,
    add_sampling_args,
    command_line,
    given,
    gpu_memory_arg,
    positive_float,
    positive_int,
    recipe_arg,
    recipe_section,
    writable_dir,
    writable_path,
)
from vlv.errors import InvalidInput


def register(sub: argparse._SubParsersAction) -> None:
    from vlv.shapes.config import (
        LAYOUTS,
        PHASES,
        SD3_PHASES,
        TEACHER_OWNED,
        DetectionSettings,
        SD3TeacherSettings,
        TeacherSettings,
    )
    from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig
    from vlv.training.recipes import list_recipes

    teacher = sub.add_parser("teacher", help="train or sample the shapes text-to-image teacher")
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="TEACHER_COMMAND")
    p = t_sub.add_parser("train", help="train a teacher (resumes when OUT holds a checkpoint)")
    p.add_argument("--data", type=Path, required=True, help="training image-caption folder")
    p.add_argument("--out", type=writable_dir, required=True, help="teacher dir (Stable Diffusion layout)")
    p.add_argument("--val", type=Path, default=None,
                   help="held-out (val split) folder for periodic accuracy (default: none, no evaluation)")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="stop (resumably) after this long (default: none, train every step)")
    p.add_argument("--tiny", action="store_true", help="tiny architecture (tests, plumbing)")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip",
                   help="an unreadable image: skip it (counted) or stop naming it")
    p.add_argument("--resume", choices=["check", "override"], default="check",
                   help="check: a started OUT resumes only with the recipe it was started with (the differing "
                        "fields are named); override: resume with these settings anyway")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="sd2: VAE + CLIP + UNet (StableDiffusionPipeline); sd3: SD3Transformer2DModel + two CLIPs "
                        "by flow matching (StableDiffusion3Pipeline), on a frozen VAE reused from --source "
                        "(default: the recipe's; no recipe given: sd2, recipe shapes; sd3: recipe shapes-sd3)")
    p.add_argument("--source", default=None,
                   help="sd3 layout: the SD-layout teacher (dir or shipped name) whose VAE and tokenizer it reuses "
                        "(default: shapes-teacher)")
    p.add_argument("--recipe", default=None, help="how the teacher trains: a recipe of vlv/recipes/teacher/ "
                   f"({', '.join(list_recipes('teacher'))}) or a JSON file, which names its layout; the flags below "
                   "override single fields, and the defaults they show are those of recipes shapes and shapes-sd3 "
                   "(default: shapes; with --layout sd3, shapes-sd3)")
    add_fields(p, TeacherSettings, "teacher settings (recipe section 'settings')",
               recipe=recipe_section("teacher", "settings"))
    shared = tuple(f.name for f in fields(TeacherSettings))
    add_fields(p, SD3TeacherSettings, "sd3 layout settings (recipe section 'settings'; the ones above apply too)",
               skip=shared, recipe=recipe_section("teacher", "settings", "shapes-sd3"))
    for phase, what in zip(PHASES, ("phase 1, the VAE", "phase 2, the text encoder + UNet"), strict=True):
        add_fields(p, TrainConfig, f"{what}: its training loop (recipe section '{phase}')", skip=TEACHER_OWNED,
                   prefix=phase, recipe=recipe_section("teacher", phase))
    for phase in SD3_PHASES:
        add_fields(p, TrainConfig, f"sd3 layout, the text encoders + transformer: its training loop (recipe section "
                   f"'{phase}')", skip=TEACHER_OWNED, prefix=phase,
                   recipe=recipe_section("teacher", phase, "shapes-sd3"))
    p.set_defaults(func=cmd_teacher_train)
    p = t_sub.add_parser("export", help="export a teacher run's latest EMA checkpoint in its layout (SD or SD3)")
    p.add_argument("teacher", type=Path, help="teacher dir being trained (holds training/)")
    p.add_argument("--out", type=writable_dir, required=True)
    p.add_argument("--fp16", action="store_true",
                   help="UNet or transformer, and VAE, in fp16 (the text encoders stay fp32)")
    p.set_defaults(func=cmd_teacher_export)
    p = t_sub.add_parser("sample", help="draw images from captions")
    p.add_argument("teacher", help="teacher dir (SD or SD3 layout) or shipped name (shapes-teacher, "
                                   "shapes-teacher-sd3); an SD3-layout one samples with its own FlowMatchEuler "
                                   "scheduler (--steps, default 28)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one caption")
    g.add_argument("--captions", type=Path, help="text file, one caption a line")
    p.add_argument("--out", type=writable_path, required=True, help="PNG file (one prompt) or folder")
    add_sampling_args(p)
    p.set_defaults(func=cmd_teacher_sample)

    train = sub.add_parser("train", help="train a VLV stage")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")

    def stage(name: str, help_text: str, out_help: str, settings: type, settings_title: str, func,
              val_help: str | None = None) -> None:
        """A recipe-driven training command: --out, --recipe, then a flag per field of its settings and loop."""
        p = train_sub.add_parser(name, help=help_text)
        p.add_argument("--out", type=writable_dir, required=True, help=out_help)
        if val_help:
            p.add_argument("--val", type=Path, default=None, help=val_help + " (default: none, no evaluation)")
            p.add_argument("--eval-n", type=positive_int, default=200, help="val samples per evaluation")
        recipe_arg(p, name)
        add_fields(p, settings, f"{settings_title} (recipe section 'settings')",
                   recipe=recipe_section(name, "settings"))
        add_fields(p, TrainConfig, "training loop (recipe section 'train')", recipe=recipe_section(name, "train"))
        if name in ("stage1", "stage2"):
            gpu_memory_arg(p)
        p.set_defaults(func=func, settings_type=settings, gpu_memory=None)

    run_dir = "run dir (resumes when it holds a checkpoint)"
    stage("stage1", "distil a frozen diffusion decoder into the VLV encoder (images only)", run_dir, Stage1Settings,
          "inputs and method", cmd_train_stage1,
          val_help="held-out images (folder, tars or parquet) for a periodic held-out loss, noise and timesteps "
                   "fixed per image, and a few reconstructions (RUN/val); a shapes folder adds reconstruction "
                   "accuracy")
    stage("lm", "pre-train the small shapes language model on caption text", "LM dir (transformers layout)",
          LMSettings, "inputs", cmd_train_lm)
    stage("florence2", "pre-train the small shapes Florence-2 on object detection (<OD>)",
          "Florence-2 dir (transformers' native layout)", DetectionSettings, "inputs", cmd_train_florence2)
    stage("stage2", "teach a causal LM to read stage-1 embeddings out as captions", run_dir, Stage2Settings,
          "inputs and method", cmd_train_stage2,
          val_help="held-out image-caption data (folder, tars or parquet) for a periodic held-out caption loss and "
                   "a few sample captions (RUN/val); a shapes folder adds caption accuracy")


# ------------------------------------------------------------------------------------------- train
def _sections(args: argparse.Namespace, task: str):
    """(recipe, settings, loop config) of a training command: the recipe's sections, each flag given on top."""
    from vlv.training.config import TrainConfig
    from vlv.training.recipes import load_sections

    return load_sections(args.recipe, task, args.settings_type, given(args, args.settings_type),
                         given(args, TrainConfig))


def _saved(done: bool, what: str, out: str) -> None:
    if int(os.environ.get("RANK", 0)):  # one line per run, not per process
        return
    print(f"{what} saved to {out}" if done else f"stopped early; run the same command to resume ({out})")


def _has_scenes(val: Path) -> bool:
    """A shapes folder (its records hold scenes), which the shapes evaluators score too."""
    from vlv.data.records import read_records

    try:
        records = read_records(val)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return bool(records) and records[0].scene is not None


def _together(evaluators: list) -> object:
    """One evaluator reporting every given one's metrics."""
    return lambda *models: {k: v for e in evaluators for k, v in e(*models).items()}


def cmd_train_stage1(args: argparse.Namespace) -> None:
    from vlv.training.recipes import resolved
    from vlv.training.stage1 import train_stage1

    recipe, settings, cfg = _sections(args, "stage1")
    evaluator = None
    if args.val:
        from vlv.training.stage1 import val_loss_evaluator

        evaluators = [val_loss_evaluator(args.val, args.eval_n, cfg.seed)]
        if _has_scenes(args.val):
            from vlv.shapes.metrics import stage1_evaluator

            evaluators.append(stage1_evaluator(args.val, args.eval_n))
        evaluator = _together(evaluators)
    done = train_stage1(settings, cfg, args.out, evaluator=evaluator,
                        recipe=resolved(recipe, train=cfg, settings=settings), gpu_memory=args.gpu_memory)
    _saved(done is not None, "encoder", args.out)


def cmd_train_stage2(args: argparse.Namespace) -> None:
    from vlv.shapes.tokenizers import tokenizer_for
    from vlv.training.recipes import resolved
    from vlv.training.stage2 import train_stage2

    recipe, settings, cfg = _sections(args, "stage2")
    evaluator = None
    if args.val:
        from vlv.training.stage2 import val_caption_evaluator

        evaluators = [val_caption_evaluator(args.val, args.eval_n, settings.image_column, settings.caption_column)]
        if _has_scenes(args.val):
            from vlv.shapes.metrics import stage2_evaluator

            evaluators.append(stage2_evaluator(args.val, args.eval_n))
        evaluator = _together(evaluators)
    done = train_stage2(settings, cfg, args.out, evaluator=evaluator, tokenizer=tokenizer_for(settings.lm),
                        recipe=resolved(recipe, train=cfg, settings=settings), gpu_memory=args.gpu_memory)
    _saved(done is not None, "captioner", args.out)


def cmd_train_lm(args: argparse.Namespace) -> None:
    from vlv.shapes.metrics import lm_judge
    from vlv.shapes.tokenizers import tokenizer_for
    from vlv.training.lm import train_lm
    from vlv.training.recipes import resolved

    recipe, settings, cfg = _sections(args, "lm")
    done = train_lm(settings, cfg, args.out, tokenizer=tokenizer_for(settings.lm),
                    judge=lm_judge if settings.val else None, recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done is not None, "language model", args.out)


def cmd_train_florence2(args: argparse.Namespace) -> None:
    from vlv.shapes.florence2 import train_florence2
    from vlv.training.recipes import resolved

    recipe, settings, cfg = _sections(args, "florence2")
    done = train_florence2(settings, cfg, args.out, recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done is not None, "Florence-2", args.out)


# ----------------------------------------------------------------------------------------- teacher
def _flags_given(args: argparse.Namespace, cls: type, prefix: str = "", not_in: type | None = None) -> list[str]:
    """The flags of ``cls``'s fields given on the command line, as typed (those of ``not_in``'s fields left out)."""
    skip = {f.name for f in fields(not_in)} if not_in else set()
    out = []
    for f in fields(cls):
        if f.name in given(args, cls, prefix) and f.name not in skip:
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            out.append(f"--{prefix}-{flag[2:]}" if prefix else flag)
    return out


def _teacher_layout(args: argparse.Namespace) -> tuple[str, str]:
    """(layout, recipe) of a teacher command: --layout picks its own recipe when none is given; a recipe of the
    other layout is refused, as is a flag that only the other layout reads."""
    from vlv.shapes.config import PHASES, SD3_PHASES, SD3TeacherSettings, TeacherSettings, recipe_layout
    from vlv.training.config import TrainConfig

    recipe = args.recipe or ("shapes-sd3" if args.layout == "sd3" else "shapes")
    layout = recipe_layout(recipe)
    if args.layout is not None and args.layout != layout:
        raise InvalidInput(f"--recipe {recipe} trains the {layout} layout, not --layout {args.layout}")
    sd2_only = _flags_given(args, TeacherSettings, not_in=SD3TeacherSettings)
    sd3_only = _flags_given(args, SD3TeacherSettings, not_in=TeacherSettings)
    for phases, names in ((PHASES, sd2_only), (SD3_PHASES, sd3_only)):
        names += [flag for phase in phases for flag in _flags_given(args, TrainConfig, phase)]
    sd3_only += ["--source"] if args.source is not None else []
    other = sorted(sd2_only if layout == "sd3" else sd3_only)
    if other:
        raise InvalidInput(f"{', '.join(other)}: not a flag of the {layout} layout's teacher")
    return layout, recipe


def cmd_teacher_train(args: argparse.Namespace) -> None:
    from vlv.shapes.config import TINY, TeacherConfig, TeacherSettings, teacher_recipe
    from vlv.training.config import TrainConfig

    layout, name = _teacher_layout(args)
    common = dict(val=args.val, max_minutes=args.minutes, command=command_line(), on_bad_image=args.on_bad_image,
                  resume_override=args.resume == "override")
    if layout == "sd3":
        from vlv.shapes.config import TINY_SD3, SD3TeacherConfig, SD3TeacherSettings, sd3_teacher_recipe
        from vlv.shapes.teacher_sd3 import train_sd3_teacher

        recipe = sd3_teacher_recipe(name, given(args, SD3TeacherSettings), given(args, TrainConfig, "transformer"))
        cfg = TINY_SD3 if args.tiny else SD3TeacherConfig()
        if args.source is not None:
            cfg = replace(cfg, source=args.source)
        done = train_sd3_teacher(args.data, args.out, cfg, recipe, **common)
    else:
        from vlv.shapes.teacher import train_teacher

        recipe = teacher_recipe(name, given(args, TeacherSettings), given(args, TrainConfig, "vae"),
                                given(args, TrainConfig, "unet"))
        done = train_teacher(args.data, args.out, TINY if args.tiny else TeacherConfig(), recipe, **common)
    print(f"teacher saved to {done}" if done else f"time budget reached; run the same command to resume ({args.out})")


def cmd_teacher_export(args: argparse.Namespace) -> None:
    import torch

    from vlv.shapes import teacher, teacher_sd3

    layout = teacher_sd3 if teacher_sd3.is_sd3_run(args.teacher) else teacher
    layout.export_checkpoint(args.teacher, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"exported to {args.out}")


def cmd_teacher_sample(args: argparse.Namespace) -> None:
    from vlv.shapes.teacher import sample_files

    if args.prompt is not None:  # "" is a valid caption: the unconditional one CFG guides against
        prompts = [args.prompt]
    else:
        try:
            text = Path(args.captions).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"--captions {args.captions}: not a UTF-8 text file") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InvalidInput(f"--captions {args.captions}: no captions in it")
    n = sample_files(args.teacher, prompts, args.out, guidance_scale=args.cfg, steps=args.steps,
                     sampler=args.sampler, seed=args.seed)
    print(f"wrote {n} image(s) to {args.out}")
