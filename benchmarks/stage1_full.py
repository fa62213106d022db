"""Full-scale stage 1 with random weights: Florence-2-large encoder + SD 2.1-base decoder, exact configs.

    python benchmarks/stage1_full.py --device cpu --batch-sizes 1 --image-size 384
    python benchmarks/stage1_full.py --device cuda --batch-sizes 8 16 32 --precision bf16 fp32
    python benchmarks/stage1_full.py --device cpu --batch-sizes 1 --online-vae   # cached latents vs online VAE

One optimizer step (AdamW over the official trainable set: queries, phi, Florence's language model) on
cached-latent-shaped inputs: per batch size and precision it prints seconds per step, images/s and peak
memory; on a GPU also the MFU against the counted ~3.2 TFLOP per image (shared/specs/performance.md).
With --online-vae each setting is also timed with the frozen VAE encoding the 384-px images inside the
step (what training without cached latents does), and the ratio online / cached is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch
from fullscale import peak_memory_gib, time_steps  # benchmarks/, first on sys.path when run as a script

from vlv.decoder import DiffusionDecoder, random_pipeline
from vlv.encoder import EncoderConfig, VLVEncoder

FLOPS_PER_IMAGE = 3.2e12  # counted, cached latents, no checkpointing (performance.md)
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def train_step(encoder: VLVEncoder, decoder: DiffusionDecoder, opt: torch.optim.Optimizer, pixels: torch.Tensor,
               latents_or_images: torch.Tensor, precision: str, seed: int) -> None:
    """One optimizer step of the stage-1 loss over the encoder's trainable set (images: the VAE encodes them)."""
    dev = pixels.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = decoder.loss(latents_or_images, encoder(pixels), torch.Generator(dev).manual_seed(seed))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--image-size", type=int, default=384, help="decoder resolution (official code: 384)")
    p.add_argument("--encoder-size", type=int, default=768, help="Florence-2 input side")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--online-vae", action="store_true", help="also time steps that VAE-encode the images")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    decoder = DiffusionDecoder(random_pipeline("sd21-base")).to(dev)
    if args.gradient_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    encoder = VLVEncoder(EncoderConfig.preset("florence2-large", decoder.text_dim, image_size=args.encoder_size))
    encoder.to(dev).train()
    n_train = sum(q.numel() for q in encoder.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in encoder.parameters()) + sum(q.numel() for q in decoder.parameters())
    print(f"built in {time.perf_counter() - t0:.0f}s: {n_all / 1e9:.2f} B parameters, {n_train / 1e6:.0f} M trainable;"
          f" device {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else ""))
    opt = torch.optim.AdamW([q for q in encoder.parameters() if q.requires_grad], lr=5e-5, betas=(0.9, 0.99),
                            weight_decay=0.01)
    latent = args.image_size // 8
    print(f"{'precision':>9} {'batch':>5} {'input':>7} {'s/step':>8} {'img/s':>8} {'peak GiB':>9} {'MFU':>6}")
    inputs = ("latents", "images") if args.online_vae else ("latents",)
    for precision in args.precision:
        for b in args.batch_sizes:
            pixels = torch.randn(b, 3, args.encoder_size, args.encoder_size, device=dev)
            x = {"latents": torch.randn(b, 4, latent, latent, device=dev),
                 "images": torch.rand(b, 3, args.image_size, args.image_size, device=dev) * 2 - 1}
            medians = {}
            for kind in inputs:
                medians[kind] = _measure(encoder, decoder, opt, pixels, x[kind], precision, args, kind)
            if len(medians) == 2 and None not in medians.values():
                ratio = medians["images"] / medians["latents"]
                print(f"{precision:>9} {b:5d}  step time, online VAE / cached latents: {ratio:.2f}x", flush=True)
            del pixels, x
    return 0


def _measure(encoder: VLVEncoder, decoder: DiffusionDecoder, opt: torch.optim.Optimizer, pixels: torch.Tensor,
             x: torch.Tensor, precision: str, args: argparse.Namespace, kind: str) -> float | None:
    """Print one row (median step time, img/s, peak memory, MFU); None on out-of-memory."""
    dev, b = pixels.device, pixels.shape[0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        times = time_steps(partial(train_step, encoder, decoder, opt, pixels, x, precision), args.steps, dev)
    except torch.OutOfMemoryError:
        times = None
    if times is None:  # outside the except block, so the failed step's activations can be freed
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        print(f"{precision:>9} {b:5d} {kind:>7} out of memory", flush=True)
        return None
    s = sorted(times)[len(times) // 2]
    mfu = ""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK.items() if k in name), None)
        mfu = f"{b / s * FLOPS_PER_IMAGE / peak:.1%}" if peak and kind == "latents" else "?"
    print(f"{precision:>9} {b:5d} {kind:>7} {s:8.2f} {b / s:8.2f} {peak_memory_gib(args.device):9.1f} {mfu:>6}",
          flush=True)
    return s


if __name__ == "__main__":
    sys.exit(main())
