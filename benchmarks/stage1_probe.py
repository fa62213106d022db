"""Does a stage-1 encoder carry information yet? A diagnostic that needs no sampling (shapes teacher).

    python benchmarks/stage1_probe.py --encoder shapes-stage1 [--n 64] [--draws 8]

On n validation scenes, with the same noise for every code, per band of timesteps:
- the teacher's diffusion loss given the true caption's token embeddings (L_true), the empty caption's
  (L_empty) and the encoder's z (L_enc), and the information fraction (L_empty - L_enc) / (L_empty - L_true):
  0 = the encoder's z is worth no more than no caption at all, 1 = worth the true caption;
- the gradient of the loss with respect to z, at the empty caption and at the encoder's z: its norm, and its
  cosine with the direction towards the true caption's embeddings (one noise draw, and ``--draws`` averaged),
  for the whole z and for its image-specific part (minus the batch mean). This is where stage 1's learning
  signal lives: which timesteps carry it, and whether the encoder sits where the signal has vanished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vlv.data import ImageCaptionFolder, to_tensor, write_shapes
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.presets import resolve_decoder, resolve_encoder
from vlv.teacher import diffusion_target

BANDS = ((0, 1000), (900, 1000), (700, 900), (500, 700), (200, 500), (0, 200))


def _loss(decoder: DiffusionDecoder, latents: torch.Tensor, z: torch.Tensor, band: tuple[int, int], seed: int,
          draws: int = 1) -> torch.Tensor:
    """Sum over images of the per-image loss, averaged over ``draws`` (t, noise) pairs from ``band``."""
    g, total = torch.Generator().manual_seed(seed), 0.0
    for _ in range(draws):
        t = torch.randint(*band, (latents.shape[0],), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        pred = decoder.unet(decoder.scheduler.add_noise(latents, noise, t), t,
                            encoder_hidden_states=decoder.encode_text_embeds(z)).sample
        total = total + ((pred - diffusion_target(decoder.scheduler, latents, noise, t)) ** 2).mean(dim=(1, 2, 3))
    return (total / draws).sum()


def _grad(decoder, latents, z, band, seed, draws) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    _loss(decoder, latents, z, band, seed, draws).backward()
    return z.grad


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1), b.flatten(1)).mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="shapes-stage1", help="stage-1 run dir or shipped name")
    p.add_argument("--teacher", default="shapes-teacher")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    decoder = DiffusionDecoder.from_pretrained(resolve_decoder(args.teacher))
    encoder = VLVEncoder.from_pretrained(resolve_encoder(args.encoder)).eval()
    folder = Path("runs/benchmarks/probe-val")
    if not (folder / "captions.jsonl").is_file():
        write_shapes(folder, n=args.n, split="val", progress=False)
    data = ImageCaptionFolder(folder, decoder.image_size, limit=args.n)
    x = to_tensor(data.images)  # (n, 3, H, W)
    nq = encoder.config.num_queries
    emb = decoder.text_encoder.get_input_embeddings()
    with torch.no_grad():
        ids = decoder.tokenizer(data.captions, padding="max_length", max_length=nq, truncation=True,
                                return_tensors="pt").input_ids
        empty = decoder.tokenizer([""] * args.n, padding="max_length", max_length=nq, return_tensors="pt").input_ids
        codes = {"true": emb(ids), "empty": emb(empty), "encoder": encoder(encoder.normalize(x))}  # (n, Nq, d_T)
        latents = decoder.latents(x, torch.Generator().manual_seed(0))
    out: dict = {"encoder": str(args.encoder), "n": args.n,
                 "z_norm": {k: round(v.norm(dim=-1).mean().item(), 4) for k, v in codes.items()}}
    print("mean |z| per position: " + ", ".join(f"{k} {v}" for k, v in out["z_norm"].items()))
    for band in BANDS:
        with torch.no_grad():
            losses = {k: _loss(decoder, latents, z, band, seed=1).item() / args.n for k, z in codes.items()}
        info = (losses["empty"] - losses["encoder"]) / max(losses["empty"] - losses["true"], 1e-12)
        row: dict = {"loss": {k: round(v, 5) for k, v in losses.items()}, "information": round(info, 4)}
        for at in ("empty", "encoder"):
            z = codes[at]
            towards = codes["true"] - z
            towards_img = towards - towards.mean(0, keepdim=True)
            g1, gk = _grad(decoder, latents, z, band, 2, 1), _grad(decoder, latents, z, band, 2, args.draws)
            row[f"grad_at_{at}"] = {
                "norm": round(g1.norm(dim=(1, 2)).mean().item(), 6),
                "cos_1": round(_cos(-g1, towards), 4), f"cos_{args.draws}": round(_cos(-gk, towards), 4),
                "cos_img_1": round(_cos(-(g1 - g1.mean(0, keepdim=True)), towards_img), 4),
                f"cos_img_{args.draws}": round(_cos(-(gk - gk.mean(0, keepdim=True)), towards_img), 4)}
        out[f"t{band[0]}-{band[1]}"] = row
        ge, gz = row["grad_at_empty"], row["grad_at_encoder"]
        print(f"t in [{band[0]:3d},{band[1]:4d}): loss true {losses['true']:.4f} empty {losses['empty']:.4f} "
              f"encoder {losses['encoder']:.4f} -> information {info:+.3f} | grad at empty: |g| {ge['norm']:.2e} "
              f"cos {ge['cos_1']:+.3f} ({args.draws} draws {ge[f'cos_{args.draws}']:+.3f}) | at encoder: |g| "
              f"{gz['norm']:.2e} cos {gz['cos_1']:+.3f} ({args.draws} draws {gz[f'cos_{args.draws}']:+.3f})",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
