"""Inference throughput in fp32 against bf16: ``embed``, ``reconstruct`` and ``caption`` (vlv.inference).

    python benchmarks/gpu_inference.py                          # on a GPU: shapes weights and full scale
    python benchmarks/gpu_inference.py --device cpu --quick     # a check that it runs (CPU numbers mean nothing)
    python benchmarks/gpu_inference.py --models full --tasks caption --precisions bf16 --max-new-tokens 300

Two model sets:
- ``shapes``: the shipped weights, loaded by ``from_pretrained(dtype=, device=)`` as ``vlv caption`` loads them
  (the load is timed too), on rendered shapes scenes. Its captions end at EOS.
- ``full``: the paper's architectures from ``vlv/configs`` with random weights, no download: Florence-2 large at
  768 px with 77 queries, SD 2.1-base (CLIP text encoder, UNet and VAE at 512 px) and Qwen2.5-3B behind psi.
  They are built empty and their random weights are drawn on the device in the precision, so the host never holds
  a 3B fp32 copy. Random LLM weights never emit EOS, so every caption runs to ``--max-new-tokens`` (the paper's
  300, 4 beams): the worst case, and the released model's usual one (it never learned EOS). ``--quick`` keeps the
  widths, cuts every stack to one layer and the images to 128 px, so a CPU runs the same code in minutes.

Per set, task and precision it prints images/s (median of ``--repeats`` timed passes over ``--images`` images,
after one warm-up batch) and peak memory: on a GPU the most allocated during the task (weights included) and the
weights alone; on a CPU the process's peak RSS so far (it only grows). The precisions run one after the other,
each set freed before the next. ``--out FILE`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import peak_memory_gib, test_scenes, write_result  # benchmarks/

from vlv.captioner import Captioner
from vlv.config import CaptionerConfig, EncoderConfig
from vlv.data.images import to_tensor
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import random_pipeline
from vlv.encoder import VLVEncoder
from vlv.inference import caption_images, embed_images, placed, reconstruct_images
from vlv.lm import build_lm, lm_config
from vlv.modeling import empty_model
from vlv.shapes.tokenizers import build_shapes_tokenizer, build_tokenizer

TASKS = ("embed", "reconstruct", "caption")
FULL = {"encoder": "florence2-large", "lm": "qwen2.5-3b", "num_queries": 77}  # the paper's stage-2 setting
QUICK_SIZE = 128  # --quick: the full set's image side in and out, so a CPU gets through it


# ------------------------------------------------------------------------------------------ model sets
def _fill_random(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Every meta parameter gets memory on ``device`` in ``dtype``: matrices N(0, 0.02), norm weights 1, biases 0
    (activations of a sane scale, for timing only); tied parameters stay one tensor. Then the buffers move."""
    gen = torch.Generator(device).manual_seed(seed)
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for m in module.modules():
        for attr, p in m._parameters.items():
            if p is not None and p.is_meta:
                holders.setdefault(id(p), []).append((m, attr))
    for group in holders.values():
        m, attr = group[0]
        old = m._parameters[attr]
        t = torch.empty(old.shape, device=device, dtype=dtype)
        if t.dim() >= 2:
            t.normal_(0.0, 0.02, generator=gen)
        else:
            t.fill_(1.0 if attr == "weight" else 0.0)
        new = torch.nn.Parameter(t, requires_grad=False)
        for holder, name in group:
            holder._parameters[name] = new
    module.to(device)


def _shallow(config: dict, layers: int | None) -> dict:
    """A config dict with every stack cut to ``layers`` (None: as it is); widths unchanged."""
    if layers is None:
        return config
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out[key] = _shallow(value, layers)
        elif key in ("num_hidden_layers", "encoder_layers", "decoder_layers", "layers_per_block"):
            out[key] = min(value, layers)
        elif key == "depths":
            out[key] = [min(d, layers) for d in value]
        elif key == "layer_types":  # one per layer (transformers 5)
            out[key] = value[:layers]
        else:
            out[key] = value
    return out


def full_set(device: torch.device, dtype: torch.dtype, num_beams: int, max_new_tokens: int, quick: bool = False
             ) -> dict[str, torch.nn.Module]:
    """The paper's architectures with random weights, drawn on ``device`` in ``dtype``; ``quick``: every stack cut
    to one layer and images of QUICK_SIZE px in and out, the widths kept."""
    layers = 1 if quick else None
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from vlv.config import read_config
    from vlv.encoder import florence2_config

    def decoder() -> DiffusionDecoder:
        pipe = random_pipeline(build_tokenizer())  # any tokenizer whose ids fit: only T("") is tokenised
        if layers is not None:
            unet = {**_shallow(dict(pipe.unet.config), layers), "sample_size": QUICK_SIZE // 8}  # latent side
            pipe.unet = UNet2DConditionModel.from_config(unet)
            pipe.vae = AutoencoderKL.from_config(_shallow(dict(pipe.vae.config), layers))
            pipe.text_encoder.encoder.layers = pipe.text_encoder.encoder.layers[:layers]
        return DiffusionDecoder(pipe)

    dec = empty_model(decoder, dtype)
    _fill_random(dec, device, dtype)
    d_t = dec.text_dim
    florence = _shallow(florence2_config(read_config(f"encoder-{FULL['encoder']}")["florence2"]).to_dict(), layers)
    enc_config = EncoderConfig.named(FULL["encoder"], text_dim=d_t, num_queries=FULL["num_queries"],
                                     florence2=florence, **({"image_size": QUICK_SIZE} if quick else {}))
    enc = empty_model(lambda: VLVEncoder(enc_config), dtype).eval()
    _fill_random(enc, device, dtype)
    lm_cfg = _shallow(lm_config(FULL["lm"]).to_dict(), layers)
    lm = build_lm(lm_cfg, dtype=dtype, empty=True)
    config = CaptionerConfig(text_dim=d_t, lm=lm_cfg, trainable="mlp", num_beams=num_beams,
                             max_new_tokens=max_new_tokens)
    cap = empty_model(lambda: Captioner(config, dec.text_encoder, enc, lm=lm, tokenizer=build_shapes_tokenizer()),
                      dtype).eval()
    _fill_random(cap, device, dtype)
    return {"encoder": enc, "decoder": dec, "captioner": cap}


def shapes_set(device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The shipped shapes weights, loaded as the commands load them."""
    cap = Captioner.from_pretrained("shapes-stage2", dtype=dtype, device=device).eval()
    return {"encoder": VLVEncoder.from_pretrained("shapes-stage1", dtype=dtype, device=device).eval(),
            "decoder": DiffusionDecoder.from_pretrained("shapes-teacher", dtype=dtype, device=device),
            "captioner": cap}


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_task(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int, repeats: int,
              device: torch.device) -> tuple[float, float]:
    """(median seconds of a pass over ``images``, peak GiB) after one warm-up batch."""
    run(images[:batch_size])
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        run(images)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_memory_gib(device)


def bench_set(name: str, device: torch.device, precision: str, args: argparse.Namespace) -> list[dict]:
    """Build or load one set in one precision and time each task."""
    dtype = placed(device, precision)["dtype"]
    _reset_peak(device)
    t = time.perf_counter()
    if name == "shapes":
        models = shapes_set(device, dtype)
    else:
        models = full_set(device, dtype, args.num_beams, args.max_new_tokens, quick=args.quick)
    _sync(device)
    load_s = time.perf_counter() - t
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    enc, dec, cap = models["encoder"], models["decoder"], models["captioner"]
    size = enc.config.image_size
    if name == "shapes":
        images = to_tensor(test_scenes(args.images, size).images)  # (N, 3, S, S) in [-1, 1]
    else:
        images = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = {"embed": lambda x: embed_images(enc, x, batch_size=args.batch_size),
            "reconstruct": lambda x: reconstruct_images(enc, dec, x, steps=args.steps, batch_size=args.batch_size),
            "caption": lambda x: caption_images(cap, x, batch_size=args.batch_size,
                                                num_beams=args.num_beams if name == "full" else None,
                                                max_new_tokens=args.max_new_tokens if name == "full" else None)}
    rows = []
    for task in args.tasks:
        seconds, peak = time_task(runs[task], images, args.batch_size, args.repeats, device)
        rows.append({"set": name, "task": task, "precision": precision, "images": len(images),
                     "batch": args.batch_size, "img_per_s": len(images) / seconds, "peak_gib": peak,
                     "weights_gib": weights_gib, "load_s": load_s})
        weights = "-" if weights_gib is None else f"{weights_gib:.2f}"
        print(f"{name:>6} {task:>11} {precision:>9} {len(images):>6} {args.batch_size:>5} "
              f"{rows[-1]['img_per_s']:>9.2f} {peak:>9.2f} {weights:>10} {load_s:>7.1f}", flush=True)
    return rows  # the models go with this frame: the caller frees them before the next set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--quick", action="store_true", help="few images, one pass, short captions, full-scale stacks "
                   "cut to one layer at 128 px: a check that everything runs")
    p.add_argument("--models", nargs="+", choices=["shapes", "full"], default=["shapes", "full"])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--images", type=int, default=None, help="images per timed pass (default 64; quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16; quick 2")
    p.add_argument("--repeats", type=int, default=None, help="timed passes, median kept (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="reconstruct: DPM-Solver++ steps (default 20; quick 2)")
    p.add_argument("--num-beams", type=int, default=None, help="full set's captions (default the paper's 4; "
                   "quick 1: on a CPU, bf16 beam search over Qwen's 152K vocabulary crawls)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="full set's caption length (default 300; "
                   "quick 4)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    quick = args.quick
    for key, normal, short in (("images", 64, 2), ("batch_size", 16, 2), ("repeats", 2, 1), ("steps", 20, 2),
                               ("max_new_tokens", 300, 4), ("num_beams", 4, 1)):
        if getattr(args, key) is None:
            setattr(args, key, short if quick else normal)
    device = placed(args.device, None)["device"]
    torch.manual_seed(0)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}; torch {torch.__version__}; full-scale stacks "
          f"{f'cut to 1 layer at {QUICK_SIZE} px' if quick else 'as configured'}; reconstruct {args.steps} steps; "
          f"full captions "
          f"{args.num_beams} beams x {args.max_new_tokens} tokens")
    print(f"{'set':>6} {'task':>11} {'precision':>9} {'images':>6} {'batch':>5} {'img/s':>9} {'peak GiB':>9} "
          f"{'weights GiB':>10} {'load s':>7}")
    rows = []
    for name in args.models:
        for precision in args.precisions:
            rows += bench_set(name, device, precision, args)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write_result(args.out, {"device": str(device) + gpu, "quick": quick, "steps": args.steps,
                            "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
