"""``vlv evaluate ...``: the paper's measurements on image files (``vlv.evaluation``), and the shapes run re-measure.

Each writes ``metrics.json`` and ``report.html`` into its ``--out`` (``shapes``: into the run dir).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import add_images, positive_int, writable_dir

INCEPTION_HELP = ("the TorchScript Inception-v3 file inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid's; never "
                  "downloaded)")
CLIP_HELP = "a local CLIP model dir (transformers layout): adds CLIP scores"
RESIZE_HELP = ("how images reach the Inception network: clean (clean-fid: PIL bicubic to 299, default) or network "
               "(own size, the network resizes: StyleGAN2-ADA)")


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="measure captions and images as the paper does (metrics.json + "
                        "report.html), or re-measure a shapes demo run")
    ev.add_argument("--run", action=_Moved, help=argparse.SUPPRESS)
    ev_sub = ev.add_subparsers(dest="evaluate_command", required=True, metavar="WHAT")

    p = ev_sub.add_parser("shapes", help="re-measure a shapes demo run dir: metrics.json and report.html")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="folder for metrics.json, report/ and report.html (default: the run folder)")
    p.add_argument("--force", action="store_true",
                   help="replace an evaluation of more scenes already in --out (default: refuse, keeping it)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--n", type=positive_int, default=500, help="scenes to measure (default 500)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale for teacher and reconstruction")
    p.add_argument("--num-beams", type=positive_int, default=1, help="caption beams (default 1: greedy)")
    p.set_defaults(func=cmd_shapes)

    p = ev_sub.add_parser("captions", help="BLEU-1..4, ROUGE-L, CIDEr-D (METEOR, SPICE with Java), CLIPScore of "
                          "vlv caption's output against reference captions")
    p.add_argument("pred", type=Path, help="predictions: vlv caption's jsonl ({\"image\", \"caption\"} rows)")
    p.add_argument("--refs", type=Path, required=True, help="references: a COCO caption annotation .json, or a "
                   "jsonl of {\"image\", \"captions\": [...]} (or {\"image\", \"caption\"}) rows")
    p.add_argument("--out", type=writable_dir, required=True, help="folder for metrics.json and report.html")
    p.add_argument("--clip", type=Path, default=None,
                   help=CLIP_HELP + " (CLIPScore, RefCLIPScore; needs --images; default: none)")
    p.add_argument("--images", type=Path, default=None,
                   help="the folder the predicted image names are in (default: none)")
    p.add_argument("--no-java", dest="java", action="store_false", default=None,
                   help="never run Java: pure-Python tokenisation, no METEOR or SPICE (default: Java when found)")
    _common(p, batch=64)
    p.set_defaults(func=cmd_captions)

    p = ev_sub.add_parser("images", help="FID, KID (and CLIP-I) of generated images against real ones")
    p.add_argument("gen", type=Path, help="folder of generated images")
    p.add_argument("real", type=Path, help="folder of real images (files of the same name pair up)")
    p.add_argument("--inception", type=Path, required=True, help=INCEPTION_HELP)
    p.add_argument("--out", type=writable_dir, required=True, help="folder for metrics.json and report.html")
    p.add_argument("--clip", type=Path, default=None,
                   help=CLIP_HELP + " (CLIP-I of the pairs; default: none)")
    p.add_argument("--resize", choices=["clean", "network"], default="clean", help=RESIZE_HELP)
    p.add_argument("--crop", choices=["none", "center"], default="none",
                   help="cut each image's centre square first (default none)")
    _common(p, batch=50)
    p.set_defaults(func=cmd_images)

    p = ev_sub.add_parser("caption-to-image", help="paper Table 1: images -> captions -> a text-to-image pipeline "
                          "-> FID / KID / CLIP-I against the originals, per CFG scale (resumable)")
    add_images(p)
    p.add_argument("--pipeline", required=True, help="a local diffusers text-to-image pipeline dir (the paper: SD 3.5 "
                   "Medium), or shapes-teacher")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="stage-2 run dir or shipped name to caption with")
    src.add_argument("--captions", type=Path, help="a captions jsonl ({\"image\", \"caption\"} rows) instead")
    p.add_argument("--inception", type=Path, required=True, help=INCEPTION_HELP)
    p.add_argument("--out", type=writable_dir, required=True, help="folder for captions, renders, metrics, page")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0],
                   help="guidance scales, one FID each (default 1 2 3 4, as the paper)")
    p.add_argument("--steps", type=positive_int, default=40, help="sampler steps (default 40, as the paper)")
    p.add_argument("--resolution", type=positive_int, default=None, help="render size (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="image i is rendered with seed + i (default 0)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="the pipeline's dtype (default fp32)")
    p.add_argument("--refs", type=Path, default=None, help="reference captions (as vlv evaluate captions "
                   "takes): adds the captions' BLEU / ROUGE-L / CIDEr-D (default: none)")
    p.add_argument("--no-java", dest="java", action="store_false", default=None,
                   help="with --refs: never run Java (pure-Python tokenisation)")
    p.add_argument("--clip", type=Path, default=None,
                   help=CLIP_HELP + " (CLIP-I of renders and originals; default: none)")
    p.add_argument("--resize", choices=["clean", "network"], default="clean", help=RESIZE_HELP)
    p.add_argument("--num-beams", type=positive_int, default=None, help="caption beams (default: the run's)")
    p.add_argument("--caption-batch-size", type=positive_int, default=64)
    _common(p, batch=8)
    p.set_defaults(func=cmd_caption_to_image)

    p = ev_sub.add_parser("reconstruction", help="paper Tables 4/5: images -> z -> the decoder -> FID / KID / "
                          "CLIP-I against the originals, per CFG scale (resumable)")
    add_images(p)
    p.add_argument("--encoder", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
    p.add_argument("--decoder", required=True, help="diffusers dir (SD2/3/XL, FLUX) or shipped name (shapes-teacher)")
    p.add_argument("--inception", type=Path, required=True, help=INCEPTION_HELP)
    p.add_argument("--out", type=writable_dir, required=True, help="folder for reconstructions, metrics, page")
    p.add_argument("--cfg", type=float, nargs="+", default=[2.0], help="guidance scales, one FID each (default 2)")
    p.add_argument("--sampler", choices=["fast", "paper"], default="paper",
                   help="paper: DDPM 50 steps (default); fast: DPM-Solver++ 20 steps (SD3/FLUX: FlowMatchEuler at "
                        "those steps)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the sampler's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=Path, default=None,
                   help=CLIP_HELP + " (CLIP-I of reconstructions and originals; default: none)")
    p.add_argument("--resize", choices=["clean", "network"], default="clean", help=RESIZE_HELP)
    _common(p, batch=16)
    p.set_defaults(func=cmd_reconstruction)


class _Moved(argparse.Action):
    """The shapes re-measure's old form (``vlv evaluate --run DIR``): one line naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"the shapes run re-measure is now: vlv evaluate shapes --run {values}")


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--batch-size", type=positive_int, default=batch, help=f"(default {batch})")
    p.add_argument("--device", default=None, help="where the networks run (default: cuda when present)")


def cmd_shapes(args: argparse.Namespace) -> None:
    from vlv.shapes.evaluate import EvalSettings, evaluate_run, headline
    from vlv.shapes.report import build_report

    out = args.out or args.run
    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    metrics = evaluate_run(args.run, settings, out=out, force=args.force)
    print(headline(metrics))
    print(f"wrote {out / 'metrics.json'} and {build_report(out)}")


def _done(out: Path, metrics: dict, keys: tuple[str, ...]) -> None:
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
    print(f"{shown}; wrote {out / 'metrics.json'} and {out / 'report.html'}")


def cmd_captions(args: argparse.Namespace) -> None:
    from vlv.evaluation.jobs import evaluate_captions

    m = evaluate_captions(args.pred, args.refs, args.out, clip=args.clip, images=args.images, java=args.java,
                          device=args.device, batch_size=args.batch_size)
    _done(args.out, m, ("bleu4", "rouge_l", "cider", "meteor", "spice", "clipscore", "refclipscore"))


def cmd_images(args: argparse.Namespace) -> None:
    from vlv.evaluation.jobs import evaluate_images

    m = evaluate_images(args.gen, args.real, args.inception, args.out, clip=args.clip, resize=args.resize,
                        crop=args.crop, batch_size=args.batch_size, device=args.device)
    _done(args.out, m, ("fid", "kid", "clip_i"))


def _per_cfg(out: Path, metrics: dict) -> None:
    if not metrics:  # another process of a launched run: the main one measures and reports
        return
    for g, m in metrics["by_cfg"].items():
        print(f"CFG {g}: " + ", ".join(f"{k} {m[k]:.4g}" for k in ("fid", "kid", "clip_i") if k in m))
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")


def cmd_caption_to_image(args: argparse.Namespace) -> None:
    from vlv.evaluation.protocols import caption_to_image

    m = caption_to_image(args.images, args.out, args.pipeline, args.inception, model=args.model,
                         captions=args.captions, cfg=args.cfg, steps=args.steps, resolution=args.resolution,
                         seed=args.seed, refs=args.refs, clip=args.clip, batch_size=args.batch_size,
                         caption_batch_size=args.caption_batch_size, num_beams=args.num_beams, device=args.device,
                         precision=args.precision, resize=args.resize, java=args.java, skip_bad=args.skip_bad)
    _per_cfg(args.out, m)


def cmd_reconstruction(args: argparse.Namespace) -> None:
    from vlv.evaluation.protocols import reconstruction

    m = reconstruction(args.images, args.out, args.encoder, args.decoder, args.inception, cfg=args.cfg,
                       sampler=args.sampler, steps=args.steps, seed=args.seed, clip=args.clip,
                       batch_size=args.batch_size, device=args.device, resize=args.resize, skip_bad=args.skip_bad)
    _per_cfg(args.out, m)
