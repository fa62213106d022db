"""Does a stage-1 encoder carry information yet? A diagnostic that needs no sampling (shapes teacher).

    python benchmarks/probes/stage1.py --encoder shapes-stage1 [--n 64] [--draws 8] [--json out.json]

On n validation scenes, with the same noise for every code, per band of timesteps:
- the teacher's diffusion loss given the true caption's token embeddings (L_true), the empty caption's
  (L_empty) and the encoder's z (L_enc), and the information fraction (L_empty - L_enc) / (L_empty - L_true):
  0 = the encoder's z is worth no more than no caption at all, 1 = worth the true caption;
- the gradient of the loss with respect to z, at the empty caption and at the encoder's z: its norm, and its
  cosine with the direction towards the true caption's embeddings (one noise draw, and ``--draws`` averaged),
  for the whole z and for its image-specific part (minus the batch mean). This is where stage 1's learning
  signal lives: which timesteps carry it, and whether the encoder sits where the signal has vanished.

The loss is the library's own (``vlv.diffusion.diffusion_loss``, what stage 1 trains on), restricted to a band
of timesteps by :class:`Band`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared helpers
from common import test_scenes, write_result  # noqa: E402

from vlv.data.images import to_tensor  # noqa: E402
from vlv.decoder import DiffusionDecoder  # noqa: E402
from vlv.diffusion import diffusion_loss  # noqa: E402
from vlv.encoder import VLVEncoder  # noqa: E402
from vlv.inference import embed_images  # noqa: E402

BANDS = ((0, 1000), (900, 1000), (700, 900), (500, 700), (200, 500), (0, 200))


class Band:
    """The decoder's scheduler seen through a band [lo, hi) of its timesteps, for ``diffusion_loss``.

    ``diffusion_loss`` draws t ~ U{0..num_train_timesteps - 1} and hands the same t to the noising, the target
    and the denoiser; here it draws from U{0..hi-lo-1}, and this adapter and :meth:`denoiser` shift every one of
    those uses by lo, so the loss is the library's at t ~ U{lo..hi-1} (the same draws as
    ``torch.randint(lo, hi)`` from the same generator).
    """

    def __init__(self, scheduler, band: tuple[int, int]):
        self.scheduler, self.lo = scheduler, band[0]
        self.config = SimpleNamespace(num_train_timesteps=band[1] - band[0],
                                      prediction_type=scheduler.config.prediction_type)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t + self.lo)

    def get_velocity(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.get_velocity(latents, noise, t + self.lo)

    def denoiser(self, decoder: DiffusionDecoder, z: torch.Tensor):
        """The frozen UNet conditioned on T(z), as ``DiffusionDecoder.loss`` conditions it, at the shifted t."""
        c = decoder.encode_text_embeds(z)  # (B, Nq, d_T)
        return lambda noisy, t: decoder.unet(noisy, t + self.lo, encoder_hidden_states=c).sample


def _loss(decoder: DiffusionDecoder, latents: torch.Tensor, z: torch.Tensor, band: tuple[int, int], seed: int,
          draws: int = 1) -> torch.Tensor:
    """Sum over images of the per-image loss, averaged over ``draws`` (t, noise) pairs from ``band``.

    Every image has as many latent elements as the next, so that sum is n times ``diffusion_loss``'s batch mean.
    """
    g, b = torch.Generator().manual_seed(seed), Band(decoder.scheduler, band)
    total = sum(diffusion_loss(b.denoiser(decoder, z), b, latents, g) for _ in range(draws))
    return total / draws * latents.shape[0]


def _grad(decoder, latents, z, band, seed, draws) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    _loss(decoder, latents, z, band, seed, draws).backward()
    return z.grad


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1), b.flatten(1)).mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="shapes-stage1", help="stage-1 run dir or shipped name")
    p.add_argument("--teacher", default="shapes-teacher", help="teacher dir or shipped name")
    p.add_argument("--n", type=int, default=64, help="validation scenes")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    decoder = DiffusionDecoder.from_pretrained(args.teacher)
    encoder = VLVEncoder.from_pretrained(args.encoder).eval()
    data = test_scenes(args.n, decoder.image_size, split="val")
    x = to_tensor(data.images)  # (n, 3, H, W)
    nq = encoder.config.num_queries
    emb = decoder.text_encoder.get_input_embeddings()
    with torch.no_grad():
        ids = decoder.tokenizer(data.captions, padding="max_length", max_length=nq, truncation=True,
                                return_tensors="pt").input_ids
        empty = decoder.tokenizer([""] * args.n, padding="max_length", max_length=nq, return_tensors="pt").input_ids
        codes = {"true": emb(ids), "empty": emb(empty), "encoder": embed_images(encoder, data.images)}
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
    write_result(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
