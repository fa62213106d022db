"""``vlv caption``, ``reconstruct``, ``embed`` and ``compose``: trained VLV parts on image files."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlv.cli.flags import add_device_args, add_images, add_sampling_args, positive_int, writable_dir, writable_file

ENCODER_HELP = "stage-1 run dir or shipped name"
DECODER_HELP = "diffusers dir (SD2/3/XL, FLUX) or shipped name"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images with a stage-2 run (one JSON line per image)")
    add_images(p)
    p.add_argument("--model", default="shapes-stage2", help="stage-2 run dir or shipped name")
    p.add_argument("--out", type=writable_file, required=True, help="captions.jsonl to write: one line per image, "
                   "named relative to the input folder (replaced if it exists; a stopped run resumes)")
    add_device_args(p)
    p.add_argument("--num-beams", type=positive_int, default=None, help="beam search width (default: the model's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="caption length limit in tokens (default: the model's)")
    p.add_argument("--postprocess", choices=["official", "none"], default=None,
                   help="caption clean-up: official (cut after the last '.', drop repeated sentences: the official "
                        "Caption_inference.process_caption) or none (default: the run's)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("reconstruct", help="redraw images from their VLV embeddings through the decoder")
    add_images(p)
    p.add_argument("--encoder", default="shapes-stage1", help=ENCODER_HELP)
    p.add_argument("--decoder", default="shapes-teacher", help=DECODER_HELP)
    p.add_argument("--out", type=writable_dir, required=True, help="output folder: a PNG per image, at its path "
                   "relative to the input folder (a stopped run resumes)")
    add_device_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("embed", help="the caption embeddings z of images (optionally T(z)), as safetensors")
    add_images(p)
    p.add_argument("--encoder", default="shapes-stage1", help=ENCODER_HELP)
    p.add_argument("--decoder", default=None, help="diffusers dir (SD2/3/XL, FLUX) or shipped name: also write T(z) "
                   "(its text encoder's output; default: none, z alone)")
    p.add_argument("--out", type=writable_file, required=True, help="safetensors file: z (N, Nq, d_T) [and T_z], the "
                   "image names in its metadata (replaced if it exists; a stopped run resumes)")
    add_device_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("compose", help="one image from the first k embeddings of two images (paper Fig. 6)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--encoder", default="shapes-stage1", help=ENCODER_HELP)
    p.add_argument("--decoder", default="shapes-teacher", help=DECODER_HELP)
    p.add_argument("--k", type=positive_int, default=None, help="embeddings kept from each (default Nq/2)")
    p.add_argument("--out", type=writable_file, required=True, help="PNG to write (replaced if it exists)")
    add_sampling_args(p)
    add_images(p, positional=False)
    add_device_args(p, batch_size=False)  # one pair, one image: nothing to batch
    p.set_defaults(func=cmd_compose)


def cmd_caption(args: argparse.Namespace) -> None:
    from vlv.inference import caption_files

    n = caption_files(args.images, args.out, model=args.model, batch_size=args.batch_size, num_beams=args.num_beams,
                      max_new_tokens=args.max_new_tokens, postprocess=args.postprocess, skip_bad=args.skip_bad,
                      device=args.device, precision=args.precision)
    print(f"wrote {n} caption(s) to {args.out}")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    from vlv.inference import reconstruct_files

    n = reconstruct_files(args.images, args.out, args.encoder, args.decoder, batch_size=args.batch_size,
                          sampler=args.sampler, guidance_scale=args.cfg, steps=args.steps, seed=args.seed,
                          skip_bad=args.skip_bad, device=args.device, precision=args.precision)
    print(f"wrote {n} reconstruction(s) to {args.out}")


def cmd_embed(args: argparse.Namespace) -> None:
    from vlv.inference import embed_files

    shapes = embed_files(args.images, args.out, args.encoder, args.decoder, batch_size=args.batch_size,
                         skip_bad=args.skip_bad, device=args.device, precision=args.precision)
    print(f"wrote {', '.join(f'{k} {v}' for k, v in shapes.items())} of {shapes['z'][0]} image(s) to {args.out}")


def cmd_compose(args: argparse.Namespace) -> None:
    from vlv.inference import compose_files

    k = compose_files(args.a, args.b, args.out, args.encoder, args.decoder, k=args.k, sampler=args.sampler,
                      guidance_scale=args.cfg, steps=args.steps, seed=args.seed, skip_bad=args.skip_bad,
                      device=args.device, precision=args.precision)
    print(f"wrote {args.out} (first {k} embeddings of each image)")
