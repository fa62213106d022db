"""``vlv import-official ...``: checkpoints of the official VLV code into vlv's dirs."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import positive_int, writable_dir


def register(sub: argparse._SubParsersAction) -> None:
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
    _import_flags(p)
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
    _import_flags(p)
    p.set_defaults(func=cmd_import_stage2)


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=positive_int, default=384,
                   help="the official run's --image_size: images are resized and centre-cropped to it before "
                        "Florence-2's processor, as the official code does (default: 384, its scripts' value)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="the dtype the trained weights are written in (default: fp32; bf16 keeps a bf16 "
                        "checkpoint's weights exactly in half the space)")


def _print_counts(counts: dict[str, int], written: str) -> None:
    """What an import mapped, per group, then what it wrote."""
    print(f"tensors mapped per group ({sum(counts.values())} in all):")
    width = max(map(len, counts), default=0)
    for group, n in counts.items():
        print(f"  {group:<{width}}  {n}")
    print(written)


def cmd_import_florence2(args: argparse.Namespace) -> None:
    from vlv.official.florence2 import convert_florence2

    _print_counts(convert_florence2(args.src, args.out), f"native Florence-2 written to {args.out}")


def cmd_import_stage1(args: argparse.Namespace) -> None:
    from vlv.official.stage1 import import_stage1

    done = import_stage1(args.ckpt, args.florence2, args.decoder, args.out, crop_size=args.image_size,
                         dtype=args.dtype)
    print(done.dtype_line())
    _print_counts(done.counts, f"stage-1 encoder written to {args.out}")


def cmd_import_stage2(args: argparse.Namespace) -> None:
    from vlv.official.stage2 import import_stage2

    done = import_stage2(args.model_pt, args.florence2, args.decoder, args.lm, args.out, crop_size=args.image_size,
                         dtype=args.dtype)
    print(done.dtype_line())
    _print_counts(done.counts, f"stage-2 captioner written to {args.out} "
                               f"(caption with: vlv caption IMAGES --model {args.out} --out X)")
