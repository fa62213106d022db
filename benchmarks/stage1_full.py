"""Full-scale stage 1 with random weights: Florence-2-large encoder + SD 2.1-base decoder, exact configs.

    python benchmarks/stage1_full.py --device cpu --batch-sizes 1 --image-size 384
    python benchmarks/stage1_full.py --device cuda --batch-sizes 8 16 32 --precision bf16 fp32
    python benchmarks/stage1_full.py --device cpu --batch-sizes 1 --online-vae   # cached latents vs online VAE
    python benchmarks/stage1_full.py --device cpu --batch-sizes 1 --cached-vision  # DaViT features cached too
    python benchmarks/stage1_full.py --device cpu --count-flops --batch-sizes       # FLOPs counted, no timing
    python benchmarks/stage1_full.py --device cpu --variants lat+vis img+vis --steps 12  # just these two

One optimizer step of the stage1/paper recipe (its encoder and trainable set: queries, phi, Florence's language
model; its AdamW settings and gradient clipping) on cached-latent-shaped inputs: per batch size and precision
it prints seconds per step, images/s and peak memory; on a GPU also the MFU against the FLOPs per image
counted in docs/performance.md (or by --count-flops).
With --online-vae each setting is also timed with the frozen VAE encoding the 384-px images inside the
step (what training without cached latents does), and the ratio online / cached is printed. With
--cached-vision each setting is also timed with the frozen DaViT's features cached (``vlv train stage1
--cache-vision``: the encoder reads (B, 577, 1024) features instead of running the vision tower), ratio printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from functools import partial

import torch
from common import adamw, flops, interleaved_times, stage1_settings, train_config  # benchmarks/

from vlv.decoder import DiffusionDecoder
from vlv.diffusion import random_pipeline
from vlv.encoder import VLVEncoder
from vlv.shapes.tokenizers import build_tokenizer
from vlv.training.recipes import load_recipe
from vlv.training.stage1 import encoder_config

RECIPE = "paper"
# docs/performance.md's counts, no checkpointing: cached latents; minus the frozen DaViT's share when its
# features are cached too (--count-flops replaces them with torch's FlopCounterMode counts of these very models)
FLOPS_PER_IMAGE = {"latents": 3.2e12, "lat+vis": 3.2e12 - 1.49e12}
VARIANTS = ("latents", "images", "lat+vis", "img+vis")  # cached latents / online VAE, x DaViT run / cached
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def count_flops(encoder: VLVEncoder, decoder: DiffusionDecoder, encoder_size: int, image_size: int
                ) -> dict[str, float]:
    """FLOPs per image of each timed variant (batch 1, forward + backward), counted by torch.utils.flop_counter;
    prints them with the bounds they set on the step-time ratios (a ratio measured above a bound is noise)."""
    dev = next(decoder.parameters()).device
    pixels = torch.randn(1, 3, encoder_size, encoder_size, device=dev)
    images = torch.rand(1, 3, image_size, image_size, device=dev) * 2 - 1
    latents = decoder.latents(images)  # (1, 4, h, w)
    with torch.no_grad():
        features = encoder.image_features(pixels)  # (1, Nv, D)
        davit = flops(lambda: encoder.image_features(pixels))
    vae = flops(lambda: decoder.latents(images))

    def step(**encoder_input) -> None:
        decoder.loss(latents, encoder(**encoder_input)).backward()
        encoder.zero_grad(set_to_none=True)

    full, cached = flops(lambda: step(pixel_values=pixels)), flops(lambda: step(image_features=features))
    print(f"counted TFLOP per image: DaViT + projector {davit / 1e12:.3f}, VAE encode {vae / 1e12:.3f}, "
          f"step on cached latents {full / 1e12:.3f}, on cached latents + vision features {cached / 1e12:.3f}")
    print(f"FLOP bounds: online VAE / cached latents {(full + vae) / full:.3f}x, with vision features cached "
          f"{(cached + vae) / cached:.3f}x; running the DaViT / cached vision features {full / cached:.3f}x",
          flush=True)
    return {"latents": full, "images": full + vae, "lat+vis": cached, "img+vis": cached + vae}


def train_step(encoder: VLVEncoder, decoder: DiffusionDecoder, opt: torch.optim.Optimizer, grad_clip: float,
               high_noise_fraction: float, encoder_input: dict[str, torch.Tensor], latents_or_images: torch.Tensor,
               precision: str, seed: int) -> None:
    """One optimizer step of the stage-1 loss over the encoder's trainable set (images: the VAE encodes them;
    ``encoder_input``: pixel_values, or the cached image_features)."""
    dev = latents_or_images.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = decoder.loss(latents_or_images, encoder(**encoder_input), torch.Generator(dev).manual_seed(seed),
                            high_noise_fraction=high_noise_fraction)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1], help="none: no timing")
    p.add_argument("--recipe", default=RECIPE, help=f"stage-1 recipe or JSON file (default {RECIPE})")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: the recipe's mixed precision")
    p.add_argument("--image-size", type=int, default=384, help="decoder resolution (official code: 384)")
    p.add_argument("--encoder-size", type=int, default=None, help="Florence-2 input side (default: the encoder "
                                                                   "config's)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute UNet activations (default: the recipe's)")
    p.add_argument("--online-vae", action="store_true", help="also time steps that VAE-encode the images")
    p.add_argument("--cached-vision", action="store_true", help="also time steps on cached DaViT features")
    p.add_argument("--count-flops", action="store_true",
                   help="count each variant's FLOPs per image first (MFU then uses them)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="time just these (default: latents, plus what --online-vae / --cached-vision add)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    recipe = load_recipe(args.recipe, "stage1")
    settings = stage1_settings(recipe, {"image_size": args.image_size,
                                        "gradient_checkpointing": args.gradient_checkpointing})
    cfg = train_config(recipe)
    precisions = args.precision or [{"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)]
    torch.manual_seed(0)

    t0 = time.perf_counter()
    decoder = DiffusionDecoder(random_pipeline(build_tokenizer())).to(dev)  # any tokenizer: the loss reads none
    if settings.gradient_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    config = encoder_config(settings, decoder.text_dim)
    if args.encoder_size is not None:
        config = replace(config, image_size=args.encoder_size)
    encoder = VLVEncoder(config)
    encoder.to(dev).train()
    enc_size, img_size = config.image_size, settings.image_size  # Florence-2's input side, the decoder's
    n_train = sum(q.numel() for q in encoder.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in encoder.parameters()) + sum(q.numel() for q in decoder.parameters())
    print(f"built in {time.perf_counter() - t0:.0f}s: {n_all / 1e9:.2f} B parameters, {n_train / 1e6:.0f} M trainable;"
          f" device {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else ""))
    opt = adamw((q for q in encoder.parameters() if q.requires_grad), cfg)
    step_args = (cfg.grad_clip, settings.high_noise_fraction)
    if args.count_flops:
        FLOPS_PER_IMAGE.update(count_flops(encoder, decoder, enc_size, img_size))
    latent = img_size // 8
    print(f"{'precision':>9} {'batch':>5} {'input':>7} {'s/step':>8} {'img/s':>8} {'peak GiB':>9} {'MFU':>6}")
    kinds = args.variants or (["latents"] + ["images"] * args.online_vae + ["lat+vis"] * args.cached_vision
                              + ["img+vis"] * (args.online_vae and args.cached_vision))
    with torch.no_grad():  # the shape of the cached features: (1, Nv, D)
        nv_d = encoder.image_features(torch.zeros(1, 3, enc_size, enc_size, device=dev)).shape[1:]
    for precision in precisions:
        for b in args.batch_sizes:
            pixels = {"pixel_values": torch.randn(b, 3, enc_size, enc_size, device=dev)}
            latents = torch.randn(b, 4, latent, latent, device=dev)
            images = torch.rand(b, 3, img_size, img_size, device=dev) * 2 - 1
            features = {"image_features": torch.randn(b, *nv_d, device=dev)}
            inputs = {"latents": (pixels, latents), "images": (pixels, images),
                      "lat+vis": (features, latents), "img+vis": (features, images)}
            medians = _measure(encoder, decoder, opt, step_args, {k: inputs[k] for k in kinds}, precision, args)
            for slow, fast, what in (("images", "latents", "online VAE / cached latents"),
                                     ("img+vis", "lat+vis", "online VAE / cached latents, vision features cached"),
                                     ("latents", "lat+vis", "running the DaViT / cached vision features")):
                if medians.get(slow) is not None and medians.get(fast) is not None:
                    print(f"{precision:>9} {b:5d}  step time, {what}: {medians[slow] / medians[fast]:.2f}x",
                          flush=True)
            del pixels, latents, images, features, inputs
    return 0


def _measure(encoder: VLVEncoder, decoder: DiffusionDecoder, opt: torch.optim.Optimizer, step_args: tuple,
             inputs: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]], precision: str,
             args: argparse.Namespace) -> dict[str, float | None]:
    """Time the variants interleaved; print a row each (median s/step, img/s, peak memory, MFU); None: OOM."""
    dev = torch.device(args.device)
    steps = {kind: partial(train_step, encoder, decoder, opt, *step_args, enc_in, x, precision)
             for kind, (enc_in, x) in inputs.items()}
    results, medians = interleaved_times(steps, args.steps, dev), {}
    opt.zero_grad(set_to_none=True)
    for kind, (_, x) in inputs.items():
        b = x.shape[0]
        if results[kind] is None:
            print(f"{precision:>9} {b:5d} {kind:>7} out of memory", flush=True)
            medians[kind] = None
            continue
        times, peak_gib = results[kind]
        s = medians[kind] = sorted(times)[len(times) // 2]
        mfu = ""
        if dev.type == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK.items() if k in name), None)
            mfu = f"{b / s * FLOPS_PER_IMAGE[kind] / peak:.1%}" if peak and kind in FLOPS_PER_IMAGE else "?"
        print(f"{precision:>9} {b:5d} {kind:>7} {s:8.2f} {b / s:8.2f} {peak_gib:9.1f} {mfu:>6}", flush=True)
    return medians


if __name__ == "__main__":
    sys.exit(main())
