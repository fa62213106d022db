"""``vlv data ...`` and ``vlv precompute ...``: make, inspect and convert datasets, and cache what training freezes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlv.cli.flags import add_parquet_columns, gpu_memory_arg, positive_int, writable_dir, writable_file
from vlv.config import CACHE_BATCH_SIZE, CACHE_SHARD_ROWS


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or inspect image-caption folders")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("shapes", help="render shapes-world scenes into an image-caption folder")
    p.add_argument("--out", type=writable_dir, required=True, help="output folder")
    p.add_argument("--n", type=positive_int, default=10_000, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--split", choices=["train", "val", "test"], default="train", help="disjoint scene split")
    p.set_defaults(func=cmd_data_shapes)
    p = data_sub.add_parser("sheet", help="contact sheet of a folder's first images")
    p.add_argument("data", type=Path, help="image-caption folder")
    p.add_argument("--out", type=writable_file, required=True, help="PNG to write")
    p.add_argument("--n", type=positive_int, default=64, help="images shown")
    p.add_argument("--cols", type=positive_int, default=8, help="images per row")
    p.set_defaults(func=cmd_data_sheet)
    p = data_sub.add_parser("shards", help="convert a folder, tar shards or parquet into indexed webdataset shards")
    p.add_argument("src", help="image-caption folder, .tar shard(s) (a dir or data/{00000..00009}.tar) or .parquet")
    p.add_argument("--out", type=writable_dir, required=True, help="folder for 00000.tar, ... (holding no .tar)")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="samples per shard")
    add_parquet_columns(p)
    p.set_defaults(func=cmd_data_shards)

    pre = sub.add_parser("precompute", help="cache what a stage keeps frozen, once, for any number of runs")
    pre_sub = pre.add_subparsers(dest="precompute_command", required=True, metavar="WHAT")
    for what, help_text in (("latents", "the VAE's posteriors (mean, std) per image, fp16"),
                            ("vision", "the frozen vision tower's features per image, fp16 (frozen towers only)"),
                            ("text-embeds", "stage 2's c = T(E(x)) per image, fp32, for runs at level mlp or "
                                            "mlp+llm")):
        p = pre_sub.add_parser(what, help=help_text + "; sharded, resumable, split over torchrun/accelerate ranks")
        if what == "text-embeds":
            p.add_argument("--decoder", default=None, help="diffusers dir (SD2/3/XL, FLUX) or shipped name: the "
                           "stage-2 runs' decoder (only its text encoder T runs; default: the stage-1 run's own)")
            p.add_argument("--encoder", required=True, help="the stage-2 runs' --encoder: a stage-1 run dir or "
                           "shipped name")
        else:
            p.add_argument("--decoder", required=True, help="diffusers dir (SD2/3/XL, FLUX) or shipped name: the "
                           "stage-1 run's decoder (its VAE%s and resolution)"
                           % ("" if what == "latents" else " is not run"))
        if what == "vision":
            p.add_argument("--encoder", required=True, help="stage-1 run dir, named encoder config or local "
                           "Florence-2 dir, as vlv train stage1 --encoder / --init take")
            p.add_argument("--trainable", choices=["config", "official", "all"], default="config",
                           help="the stage-1 run's --trainable for a named encoder")
            p.add_argument("--seed", type=int, default=0, help="the stage-1 run's seed (a random-init tower's "
                           "weights follow it)")
        p.add_argument("--data", required=True, help="image folder, tar shards or parquet, as --data of training")
        add_parquet_columns(p)
        p.add_argument("--out", type=writable_dir, required=True, help="cache dir (a re-run finishes it)")
        kind = what.replace("-", "_")
        p.add_argument("--image-size", type=positive_int, default=None, help="data resolution (default: " + (
            "the stage-1 run's, else the encoder's, as stage 2 reads it)" if what == "text-embeds"
            else "the decoder's, as in training)"))
        p.add_argument("--batch-size", type=positive_int, default=CACHE_BATCH_SIZE[kind],
                       help="images per forward" + (
                           "; the runs' per-process --batch-size, so the rows are the bits their steps compute"
                           if what == "text-embeds" else ""))
        p.add_argument("--shard-rows", type=positive_int, default=CACHE_SHARD_ROWS, help="samples per shard")
        p.add_argument("--num-workers", type=int, default=2, help="decoding workers")
        p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip",
                       help="an unreadable image: an empty row (skipped in training) or stop")
        p.add_argument("--precision", choices=["no", "bf16"], default="no",
                       help="autocast of the frozen model, as the runs' --precision")
        gpu_memory_arg(p)
        p.set_defaults(func=cmd_precompute, what=kind)


def cmd_data_shapes(args: argparse.Namespace) -> None:
    from vlv.shapes.data import write_shapes

    t0 = time.perf_counter()
    write_shapes(args.out, n=args.n, seed=args.seed, split=args.split, progress=not args.quiet)
    print(f"wrote {args.n} {args.split} scenes to {args.out} in {time.perf_counter() - t0:.1f}s")


def cmd_data_sheet(args: argparse.Namespace) -> None:
    from vlv.shapes.report import save_contact_sheet

    save_contact_sheet(args.data, args.out, n=args.n, cols=args.cols)
    print(f"wrote {args.out}")


def cmd_data_shards(args: argparse.Namespace) -> None:
    from vlv.data.datasets import open_dataset
    from vlv.data.shards import write_shards

    t0 = time.perf_counter()
    src = open_dataset(args.src, image_column=args.image_column, caption_column=args.caption_column)
    shards = write_shards(src, args.out, args.shard_size, progress=not args.quiet)
    print(f"wrote {len(src)} samples in {len(shards)} shard(s) to {args.out} in {time.perf_counter() - t0:.1f}s")


def cmd_precompute(args: argparse.Namespace) -> None:
    from vlv.training.stage1 import precompute
    from vlv.training.stage2 import precompute_text_embeds

    t0 = time.perf_counter()
    if args.what == "text_embeds":
        done = precompute_text_embeds(args.decoder, args.encoder, args.data, args.out, batch_size=args.batch_size,
                                      shard_rows=args.shard_rows, num_workers=args.num_workers,
                                      on_bad_image=args.on_bad_image, precision=args.precision,
                                      image_column=args.image_column, caption_column=args.caption_column,
                                      progress=not args.quiet, image_size=args.image_size,
                                      gpu_memory=args.gpu_memory)
    else:
        done = precompute(args.what, args.decoder, args.data, args.out, encoder=getattr(args, "encoder", None),
                          trainable=getattr(args, "trainable", "config"), seed=getattr(args, "seed", 0),
                          image_size=args.image_size, batch_size=args.batch_size, shard_rows=args.shard_rows,
                          num_workers=args.num_workers, on_bad_image=args.on_bad_image, precision=args.precision,
                          image_column=args.image_column, caption_column=args.caption_column,
                          progress=not args.quiet, gpu_memory=args.gpu_memory)
    print(f"rank {done.rank}/{done.world}: {args.what} cache of {done.samples} samples at {done.image_size} px in "
          f"{args.out} ({done.bad} bad image(s) left empty) in {time.perf_counter() - t0:.1f}s")
