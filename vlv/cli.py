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
    done = train_teacher(args.data, args.out, cfg, recipe, val=args.val, max_minutes=args.minutes,
                         command="vlv " + " ".join(sys.argv[1:]))
    print(f"teacher saved to {done}" if done else f"time budget reached; run the same command to resume ({args.out})")


def cmd_teacher_export(args: argparse.Namespace) -> None:
    import torch

    from vlv.teacher import export_checkpoint

    export_checkpoint(args.teacher, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"exported to {args.out}")


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


# ---------------------------------------------------------------------------------------- stage 1
def cmd_train_stage1(args: argparse.Namespace) -> None:
    from vlv.presets import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)  # fail fast, before the heavy imports
    if args.init:
        resolve_encoder(args.init)
    for folder in (args.data, args.val):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"no such data folder: {folder}")
    from vlv.stage1 import Stage1Settings, check_settings, train_stage1
    from vlv.train import TrainConfig

    high_noise = args.high_noise_fraction
    if high_noise is None:
        high_noise = 0.25 if args.encoder == "shapes" else 0.0
    settings = Stage1Settings(decoder=str(args.decoder), data=str(args.data), encoder=args.encoder,
                              num_queries=args.nq, trainable=args.trainable, image_size=args.image_size,
                              cache_latents=not args.no_cache_latents, cache_vision=args.cache_vision,
                              gradient_checkpointing=args.gradient_checkpointing,
                              val=str(args.val) if args.val else None, eval_n=args.eval_n,
                              high_noise_fraction=high_noise,
                              init=str(args.init) if args.init else None, phi_init_gain=args.phi_init_gain)
    check_settings(settings)
    lr = args.lr if args.lr is not None else (1e-3 if args.encoder == "shapes" else 5e-5)
    steps = 10**9 if args.budget_minutes else args.steps  # a budgeted run plans its own count after a few steps
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=lr, betas=(0.9, 0.99), weight_decay=0.01,
                      grad_clip=1.0, warmup_steps=min(100, steps // 10), mixed_precision=args.precision,
                      eval_every=args.eval_every, max_minutes=args.minutes, budget_minutes=args.budget_minutes,
                      seed=args.seed)
    done = train_stage1(settings, cfg, args.out)
    print(f"encoder saved to {args.out}" if done else f"stopped early; run the same command to resume ({args.out})")


def _load_encoder_decoder(args: argparse.Namespace):
    from vlv.presets import resolve_decoder, resolve_encoder

    decoder_path, encoder_path = resolve_decoder(args.decoder), resolve_encoder(args.encoder)
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder

    return VLVEncoder.from_pretrained(encoder_path).eval(), DiffusionDecoder.from_pretrained(decoder_path)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from vlv.data import list_images, load_image, to_pil, to_tensor
    from vlv.stage1 import reconstruct_images

    paths = list_images(args.images)
    encoder, decoder = _load_encoder_decoder(args)
    size = decoder.image_size
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
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
    import torch

    from vlv.data import load_image, to_pil, to_tensor
    from vlv.decoder import compose

    for p in (args.a, args.b):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such image: {p}")
    encoder, decoder = _load_encoder_decoder(args)
    size = decoder.image_size
    k = args.k or encoder.config.num_queries // 2
    with torch.no_grad():
        x = to_tensor(np.stack([load_image(p, size) for p in (args.a, args.b)]))
        z = encoder(encoder.normalize(x))  # (2, Nq, d_T)
        mixed = compose(z[:1], z[1:], k)  # (1, 2k, d_T)
        gen = torch.Generator().manual_seed(args.seed)
        image = decoder.reconstruct(mixed, guidance_scale=args.cfg, steps=args.steps, sampler=args.sampler,
                                    generator=gen) * 2 - 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image)[0].save(args.out)
    print(f"wrote {args.out} (first {k} embeddings of each image)")


# ---------------------------------------------------------------------------------------- stage 2
def _require_dirs(*folders) -> None:
    for folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")


def cmd_train_lm(args: argparse.Namespace) -> None:
    _require_dirs(args.data, args.val)
    from vlv.lm import LMSettings, train_lm
    from vlv.train import TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.01,
                      warmup_steps=min(100, args.steps // 10), eval_every=args.eval_every, max_minutes=args.minutes,
                      seed=args.seed)
    done = train_lm(LMSettings(data=str(args.data), lm=args.lm, val=str(args.val) if args.val else None), cfg,
                    args.out)
    print(f"language model saved to {args.out}" if done else f"stopped early; run again to resume ({args.out})")


def cmd_train_stage2(args: argparse.Namespace) -> None:
    from vlv.presets import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)
    _require_dirs(args.data, args.val)
    resolve_encoder(args.encoder)
    from vlv.stage2 import Stage2Settings, train_stage2
    from vlv.train import TrainConfig

    settings = Stage2Settings(decoder=str(args.decoder), encoder=str(args.encoder), lm=str(args.lm),
                              data=str(args.data), trainable=args.trainable, lora_rank=args.lora_rank,
                              val=str(args.val) if args.val else None, eval_n=args.eval_n)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.01,
                      warmup_steps=min(100, args.steps // 10), mixed_precision=args.precision,
                      eval_every=args.eval_every, max_minutes=args.minutes, seed=args.seed)
    done = train_stage2(settings, cfg, args.out)
    print(f"captioner saved to {args.out}" if done else f"stopped early; run again to resume ({args.out})")


def cmd_caption(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    from tqdm.auto import tqdm

    from vlv.data import atomic_write_text, list_images, load_image, to_tensor

    paths = list_images(args.images)
    from vlv.presets import resolve_stage2

    resolve_stage2(args.model)  # fail fast, before the heavy imports
    from vlv.stage2 import caption_images, load_stage2

    captioner = load_stage2(args.model).eval()
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
    from vlv.demo import run_demo

    run_demo(args.out, preset=args.preset, minutes=args.minutes)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if not (args.run / "teacher" / "model_index.json").is_file():
        raise FileNotFoundError(f"{args.run} is not a VLV run dir (no teacher/model_index.json)")
    from vlv.evaluate import EvalSettings, evaluate_run
    from vlv.report import build_report

    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    evaluate_run(args.run, settings)
    print(f"wrote {args.run / 'metrics.json'} and {build_report(args.run)}")


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
    p = t_sub.add_parser("export", help="export a teacher still training (latest EMA checkpoint) in SD layout")
    p.add_argument("teacher", type=Path, help="teacher dir being trained (holds training/)")
    p.add_argument("--out", type=writable_dir, required=True)
    p.add_argument("--fp16", action="store_true", help="UNet and VAE in fp16 (the text encoder stays fp32)")
    p.set_defaults(func=cmd_teacher_export)
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

    train = sub.add_parser("train", help="train a VLV stage")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    p = train_sub.add_parser("stage1", help="distil a frozen diffusion decoder into the VLV encoder (images only)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or preset (shapes-teacher)")
    p.add_argument("--data", type=Path, required=True, help="image(-caption) folder; captions are not used")
    p.add_argument("--out", type=writable_dir, required=True, help="run dir (resumes when it holds a checkpoint)")
    p.add_argument("--val", type=Path, default=None, help="shapes folder for periodic reconstruction accuracy")
    p.add_argument("--encoder", default="shapes", help="encoder preset (shapes, florence2-large) or a local "
                   "Florence-2 dir")
    p.add_argument("--nq", type=positive_int, default=77, help="number of learnable queries Nq (default 77)")
    p.add_argument("--trainable", choices=["preset", "default", "all"], default="preset",
                   help="default: queries + phi + Florence's language model (official); all: everything")
    p.add_argument("--image-size", type=positive_int, default=None, help="data resolution (default: decoder's)")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 for shapes, 5e-5 (paper) otherwise")
    p.add_argument("--precision", choices=["no", "bf16"], default="no", help="fp32 (paper) or bf16 autocast")
    p.add_argument("--no-cache-latents", action="store_true", help="encode images with the VAE every step")
    p.add_argument("--cache-vision", action="store_true",
                   help="cache the frozen vision tower's features once (no DaViT in any step; "
                        "~1.2 MB of disk per image at full scale); needs a frozen vision tower")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations")
    p.add_argument("--high-noise-fraction", type=fraction, default=None,
                   help="share of timesteps drawn from the upper (layout) half; 0 = the paper's uniform t "
                        "(default 0.25 for the shapes encoder, which learnt nothing in 2750 steps at 0; else 0)")
    p.add_argument("--init", default=None, help="start from this stage-1 run's (or shipped name's) encoder weights "
                   "with a fresh optimizer and schedule (same encoder architecture; a smaller --nq takes its "
                   "first Nq queries)")
    p.add_argument("--phi-init-gain", type=positive_float, default=None,
                   help="scale phi's output layer by this at init, so z starts at the large norm trained encoders "
                        "reach; default: the preset's (16 for shapes, none for florence2-large)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between val evaluations (0: never)")
    p.add_argument("--eval-n", type=positive_int, default=200)
    p.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--budget-minutes", type=positive_float, default=None,
                   help="plan the step count (and the cosine schedule) to fill this wall time; overrides --steps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_stage1)

    p = train_sub.add_parser("lm", help="pre-train the small shapes language model on caption text")
    p.add_argument("--data", type=Path, required=True, help="image-caption folder (captions only are read)")
    p.add_argument("--out", type=writable_dir, required=True, help="LM dir (transformers layout)")
    p.add_argument("--val", type=Path, default=None)
    p.add_argument("--lm", default="qwen2-shapes", help="LM preset (random init) or a local LM dir")
    p.add_argument("--steps", type=positive_int, default=1500)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_lm)
    p = train_sub.add_parser("stage2", help="teach a causal LM to read stage-1 embeddings out as captions")
    p.add_argument("--encoder", required=True, help="stage-1 run dir (never modified) or shipped name (shapes-stage1)")
    p.add_argument("--lm", required=True, help="LM dir (vlv train lm output, or a local Qwen2.5 dir), an LM preset "
                   "(random init) or the shipped shapes-lm")
    p.add_argument("--decoder", default="shapes-teacher", help="Stable Diffusion dir or preset: its text encoder T")
    p.add_argument("--data", type=Path, required=True, help="image-caption folder")
    p.add_argument("--out", type=writable_dir, required=True, help="run dir (resumes when it holds a checkpoint)")
    p.add_argument("--val", type=Path, default=None)
    p.add_argument("--trainable", choices=["mlp", "mlp+llm", "mlp+llm+encoder"], default="mlp+llm+encoder")
    p.add_argument("--lora-rank", type=int, default=0, help="0: the LLM trains in full at the llm levels; r > 0: "
                   "rank-r LoRA adapters (peft) train instead and the base LLM stays frozen")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=["no", "bf16"], default="no")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-n", type=positive_int, default=200)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_stage2)

    p = sub.add_parser("caption", help="caption images with a stage-2 run (one JSON line per image)")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--model", default="shapes-stage2", help="stage-2 run dir or shipped name (default shapes-stage2)")
    p.add_argument("--out", type=Path, required=True, help="captions.jsonl to write")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--num-beams", type=positive_int, default=None, help="default: the run's (4)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("reconstruct", help="redraw images from their VLV embeddings through the decoder")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or preset (shapes-teacher)")
    p.add_argument("--out", type=writable_dir, required=True, help="output folder (file names kept)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("compose", help="one image from the first k embeddings of two images (paper Fig. 6)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="Stable Diffusion dir or preset (shapes-teacher)")
    p.add_argument("--k", type=positive_int, default=None, help="embeddings kept from each (default Nq/2)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("demo", help="the main job on the embedded shapes world")
    p.add_argument("--out", type=writable_dir, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--preset", choices=["default", "quick"], default="default")
    p.add_argument("--minutes", type=float, default=None,
                   help="whole-run time target; training fills what data and evaluation leave (default 45)")
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
