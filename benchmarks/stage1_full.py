"""Full-scale stage 1 with random weights: Florence-2-large encoder + SD 2.1-base decoder, exact configs.

    python benchmarks/stage1_full.py --device cpu --batch-sizes 1 --image-size 384
    python benchmarks/stage1_full.py --device cuda --batch-sizes 8 16 32 --precision bf16 fp32

One optimizer step (AdamW over the official trainable set: queries, phi, Florence's language model) on
cached-latent-shaped inputs: per batch size and precision it prints seconds per step, images/s and peak
memory; on a GPU also the MFU against the counted ~3.2 TFLOP per image (shared/specs/performance.md).
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
               latents: torch.Tensor, precision: str, seed: int) -> None:
    """One optimizer step of the stage-1 loss over the encoder's trainable set."""
    dev = pixels.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = decoder.loss(latents, encoder(pixels), torch.Generator(dev).manual_seed(seed))
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
    print(f"{'precision':>9} {'batch':>5} {'s/step':>8} {'img/s':>8} {'peak GiB':>9} {'MFU':>6}")
    for precision in args.precision:
        for b in args.batch_sizes:
            pixels = torch.randn(b, 3, args.encoder_size, args.encoder_size, device=dev)
            latents = torch.randn(b, 4, latent, latent, device=dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                times = time_steps(partial(train_step, encoder, decoder, opt, pixels, latents, precision),
                                   args.steps, dev)
            except torch.OutOfMemoryError:
                times = None
            if times is None:  # outside the except block, so the failed step's activations can be freed
                opt.zero_grad(set_to_none=True)
                del pixels, latents
                torch.cuda.empty_cache()
                print(f"{precision:>9} {b:5d} out of memory", flush=True)
                continue
            s = sorted(times)[len(times) // 2]
            mfu = ""
            if dev.type == "cuda":
                name = torch.cuda.get_device_name()
                peak = next((v for k, v in PEAK.items() if k in name), None)
                mfu = f"{b / s * FLOPS_PER_IMAGE / peak:.1%}" if peak else "?"
            print(f"{precision:>9} {b:5d} {s:8.2f} {b / s:8.2f} {peak_memory_gib(args.device):9.1f} {mfu:>6}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
