"""Both paper recipes on one GPU, real architectures with random weights: speed, peak memory against ``vlv plan``,
and MFU from counted FLOPs, in under 8 minutes.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json          # on the GPU (H100 / H200: ~5 min)
    python benchmarks/gpu.py --peak-tflops 989                          # the MFU's peak (default: from the name)
    python benchmarks/gpu.py --device cpu --tiny                        # the same code on the shapes configs
    python benchmarks/gpu.py --tiny --dry-run                           # what would run, and its plans; no steps

Read from vlv/recipes/stage{1,2}/paper.json when it runs (batch, precision, trainable sets, gradient
checkpointing, clipping, AdamW), on one process:

- stage 1 (Florence-2-large encoder, SD 2.1-base decoder) at --image-size px (official: 384): images/s of one
  optimizer step in fp32 and bf16 autocast, with the VAE's latents and the DaViT's features cached or computed in
  the step (the four ways a run can read its batch), interleaved (docs/performance.md: ratios in one run);
- stage 2 (+ Qwen2.5-3B): tokens/s (prefix + caption tokens of the LLM) at captions of --caption-tokens tokens.

Every row: peak allocated memory against the estimate of ``vlv.training.plan`` for that very step (one process,
no sharding), and MFU = images/s x FLOPs per image / peak FLOP/s, the FLOPs counted by the plan on the model with
gradient checkpointing off (model FLOPs: recomputation is not useful work); on a GPU the FLOP rate of the bf16
tensor cores is the peak for every row. The plans are made on the CPU by worker processes while the GPU runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from common import interleaved_times, time_steps, write_result  # benchmarks/

GIB = 2**30
PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s
KINDS = {"lat+pix": (True, False), "lat+vis": (True, True), "img+pix": (False, False), "img+vis": (False, True)}
# (latents cached, vision features cached): the four ways a stage-1 step reads its batch


# --------------------------------------------------------------------------------------------- sections
def sections(stage: str, args: argparse.Namespace, **settings_overrides):
    """The paper recipe's settings and loop for one process, as its file says now (the tiny run: shapes sources)."""
    from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
    from vlv.training.recipes import load_recipe, section

    recipe = load_recipe("paper", stage)
    train = {"sharding": "ddp", "grad_accum": 1}
    if args.tiny:
        train["batch_size"] = 2
    batch = args.stage1_batch if stage == "stage1" else args.stage2_batch
    if batch:
        train["batch_size"] = batch
    train.update(settings_overrides.pop("train", {}))
    cfg = section(recipe, "train", TrainConfig, train)
    if stage == "stage1":
        over = {"image_size": 64 if args.tiny else args.image_size, **settings_overrides}
        if args.tiny:
            over["encoder"] = "shapes"
        return recipe, section(recipe, "settings", Stage1Settings, over, decoder=decoder_source(args), data=""), cfg
    return recipe, section(recipe, "settings", Stage2Settings, settings_overrides, decoder=decoder_source(args),
                           encoder="shapes" if args.tiny else "florence2-large",
                           lm="qwen2-shapes" if args.tiny else "qwen2.5-3b", data=""), cfg


def decoder_source(args: argparse.Namespace) -> str:
    return "shapes-teacher" if args.tiny else "sd21-base"


# --------------------------------------------------------------------------------------------- plans (CPU)
def plan_job(job: dict) -> dict:
    """One plan, in a worker process: the peak bytes and FLOPs per sample of a row's step."""
    torch.set_num_threads(1)
    from vlv.shapes.tokenizers import build_shapes_tokenizer
    from vlv.training.plan import plan_stage1, plan_stage2

    args = argparse.Namespace(**job["args"])
    _, settings, cfg = sections(job["stage"], args, **job["overrides"])
    if job["stage"] == "stage1":
        plan = plan_stage1(settings, cfg, target="cuda")
    else:
        plan = plan_stage2(settings, cfg, target="cuda", tokenizer=build_shapes_tokenizer(),
                           caption_tokens=args.caption_tokens)
    return {"peak_bytes": plan.memory.peak, "flops_per_sample": plan.flops_per_sample, "memory": vars(plan.memory)}


def plan_jobs(args: argparse.Namespace, checkpointing: dict[str, bool]) -> dict[str, dict]:
    """Per row: the plan of its step (memory), and when the recipe checkpoints, one without (model FLOPs)."""
    jobs: dict[str, dict] = {}
    common = {"args": vars(args)}
    for precision in ("fp32", "bf16"):
        for kind, (latents, vision) in KINDS.items():
            over = {"cache_latents": latents, "cache_vision": vision,
                    "train": {"mixed_precision": "bf16" if precision == "bf16" else "no"}}
            jobs[f"stage1 {precision} {kind}"] = {**common, "stage": "stage1", "overrides": over}
            if checkpointing["stage1"] and precision == "fp32":
                jobs[f"stage1 flops {kind}"] = {**common, "stage": "stage1",
                                                "overrides": {**over, "gradient_checkpointing": False}}
    jobs["stage2"] = {**common, "stage": "stage2", "overrides": {}}
    if checkpointing["stage2"]:
        jobs["stage2 flops"] = {**common, "stage": "stage2", "overrides": {"gradient_checkpointing": False}}
    return jobs


# --------------------------------------------------------------------------------------------- steps (GPU)
def stage1_models(args: argparse.Namespace, dev: torch.device):
    from vlv.decoder import DiffusionDecoder
    from vlv.diffusion import pipeline_from_configs
    from vlv.encoder import VLVEncoder
    from vlv.training.plan import decoder_configs
    from vlv.training.stage1 import encoder_config

    _, settings, cfg = sections("stage1", args)
    torch.manual_seed(0)
    with dev:  # random init where the weights will live: seconds, not minutes, for 2 B parameters
        decoder = DiffusionDecoder(pipeline_from_configs(decoder_configs(decoder_source(args))))
        encoder = VLVEncoder(encoder_config(settings, decoder.text_dim))
    if settings.gradient_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    return encoder.to(dev).train(), decoder.to(dev), settings, cfg


def stage1_rows(args: argparse.Namespace, dev: torch.device, plans: dict, deadline: float) -> list[dict]:
    """Images/s of every (precision, batch kind), interleaved per precision; peak memory and MFU per row."""
    from vlv.training.draws import step_draws
    from vlv.training.stage1 import stage1_loss

    encoder, decoder, settings, cfg = stage1_models(args, dev)
    b, side = cfg.batch_size, settings.image_size
    down = 2 ** (len(decoder.vae.config.block_out_channels) - 1)
    latent = (b, decoder.vae.config.latent_channels, side // down, side // down)
    with torch.no_grad():
        features = encoder.image_features(torch.zeros(1, 3, encoder.config.image_size, encoder.config.image_size,
                                                      device=dev)).shape[1:]
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def batch(latents: bool, vision: bool) -> dict[str, torch.Tensor]:  # what Stage1Task.batch gives
        out = {} if latents and vision else {"images": torch.rand(b, 3, side, side, device=dev) * 2 - 1}
        if not vision:
            s = encoder.config.image_size  # the encoder's pixel_values, as its transform makes them
            out["pixel_values"] = torch.randn(b, 3, s, s, device=dev)
        if latents:
            out.update(mean=torch.randn(latent, device=dev), std=torch.rand(latent, device=dev) + 0.1)
        if vision:
            out["vision"] = torch.randn(b, *features, device=dev)
        return out

    def step(kind: str, precision: str, i: int) -> None:
        x = batch(*KINDS[kind])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = stage1_loss(decoder, encoder, x, step_draws(cfg.seed, i, 0, 1, dev),
                               settings.high_noise_fraction).mean
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    for precision in ("fp32", "bf16"):
        if time.perf_counter() > deadline:
            print(f"stage 1 {precision}: skipped, out of time", flush=True)
            continue
        steps = {kind: (lambda i, k=kind, p=precision: step(k, p, i)) for kind in KINDS}
        for kind, result in interleaved_times(steps, args.steps, dev).items():
            rows.append(_row("stage1", f"{precision} {kind}", b, result, plans, f"stage1 {precision} {kind}",
                             f"stage1 flops {kind}", args, samples_per_step=b))
    return rows  # the models go with this frame, before stage 2 builds its own


def stage2_rows(args: argparse.Namespace, dev: torch.device, plans: dict) -> list[dict]:
    """Tokens/s of the stage-2 step (prefix + caption tokens through the LLM)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from vlv.captioner import Captioner
    from vlv.config import CaptionerConfig
    from vlv.encoder import VLVEncoder
    from vlv.lm import build_lm
    from vlv.shapes.tokenizers import build_shapes_tokenizer
    from vlv.training.config import Stage1Settings
    from vlv.training.plan import decoder_configs
    from vlv.training.stage1 import encoder_config
    from vlv.training.stage2 import stage2_loss

    _, settings, cfg = sections("stage2", args)
    text = decoder_configs(decoder_source(args))["text_encoder"]
    torch.manual_seed(0)
    with dev:
        te = CLIPTextModel(CLIPTextConfig.from_dict({k: v for k, v in text.items() if k != "torch_dtype"}))
        stage1 = Stage1Settings(decoder="", data="", encoder=settings.encoder, trainable="official")
        encoder = VLVEncoder(encoder_config(stage1, te.config.hidden_size))
        config = CaptionerConfig(text_dim=te.config.hidden_size, lm=settings.lm, trainable=settings.trainable,
                                 max_new_tokens=settings.max_new_tokens, lora_rank=settings.lora_rank)
        captioner = Captioner(config, te.requires_grad_(False), encoder, lm=build_lm(settings.lm),
                              tokenizer=build_shapes_tokenizer())
    if settings.gradient_checkpointing:
        captioner.lm.activation_checkpointing_enable()
    captioner.to(dev).train()
    params = [p for p in captioner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    b, length = cfg.batch_size, args.caption_tokens
    nq, side, vocab = encoder.config.num_queries, encoder.config.image_size, captioner.lm.config.vocab_size
    cached = settings.caches_text_embeds

    def step(_i: int) -> None:
        ids = torch.randint(3, vocab, (b, length), device=dev)
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if cached:
            x["text_embeds"] = torch.randn(b, nq, te.config.hidden_size, device=dev)
        else:
            x["pixel_values"] = torch.randn(b, 3, side, side, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            loss = stage2_loss(captioner, x).mean
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        times = time_steps(step, args.steps, dev)
        result = (times, torch.cuda.max_memory_allocated() / GIB if dev.type == "cuda" else None)
    except torch.OutOfMemoryError:
        result = None
    tokens = b * (nq + length)
    return [_row("stage2", f"{'bf16' if cfg.mixed_precision == 'bf16' else 'fp32'} tokens", tokens, result, plans,
                 "stage2", "stage2 flops", args, samples_per_step=b)]


def _row(stage: str, name: str, units: int, result, plans: dict, plan_key: str, flops_key: str,
         args: argparse.Namespace, samples_per_step: int) -> dict:
    """One table row: units/s (images, or tokens), peak GiB and the plan's estimate, MFU."""
    plan = plans.get(plan_key) or {}
    row = {"stage": stage, "row": name, "estimate_gib": plan.get("peak_bytes", 0) / GIB or None}
    if result is None:
        row.update(oom=True)
        print(f"{stage} {name:>14}: out of memory (estimate {row['estimate_gib'] or 0:.1f} GiB)", flush=True)
        return row
    times, peak = result
    s = sorted(times)[len(times) // 2]
    flops = (plans.get(flops_key) or plan).get("flops_per_sample")
    mfu = samples_per_step / s * flops / args.peak_flops if flops and args.peak_flops else None
    row.update(s_per_step=s, per_s=units / s, peak_gib=peak if args.device != "cpu" else None,
               flops_per_sample=flops, mfu=mfu)
    unit = "img/s" if stage == "stage1" else "tok/s"
    peak_text = f"{peak:7.1f}" if row["peak_gib"] is not None else "    cpu"
    est = f"{row['estimate_gib']:8.1f}" if row["estimate_gib"] else "       ?"
    print(f"{stage} {name:>14} {s:8.3f} {units / s:10.1f} {unit} {peak_text} {est} "
          f"{f'{mfu:.1%}' if mfu is not None else '?':>6}", flush=True)
    return row


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the shapes configs (a CPU check that the script runs)")
    p.add_argument("--dry-run", action="store_true", help="print the rows and their plans; take no step")
    p.add_argument("--image-size", type=int, default=384, help="stage-1 data resolution (official: 384)")
    p.add_argument("--caption-tokens", type=int, default=77, help="stage-2 caption + EOS tokens per sample")
    p.add_argument("--stage1-batch", type=int, default=None, help="default: the recipe's per-process batch")
    p.add_argument("--stage2-batch", type=int, default=None, help="default: the recipe's per-process batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the MFU's peak, dense bf16 TFLOP/s (default: from the GPU's name, H100/H200 989)")
    p.add_argument("--minutes", type=float, default=7.0, help="skip what is left after this long")
    p.add_argument("--workers", type=int, default=None, help="processes making the plans (default: CPUs - 2)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + 60 * args.minutes
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    args.peak_flops = (args.peak_tflops * 1e12 if args.peak_tflops
                       else next((v for k, v in PEAK.items() if k in name), None))
    _, s1, c1 = sections("stage1", args)
    _, s2, c2 = sections("stage2", args)
    print(f"device {name}; stage1/paper: batch {c1.batch_size}, {s1.image_size} px, gradient checkpointing "
          f"{s1.gradient_checkpointing}; stage2/paper: batch {c2.batch_size}, {c2.mixed_precision}, level "
          f"{s2.trainable}, gradient checkpointing {s2.gradient_checkpointing}, {args.caption_tokens} caption "
          f"tokens; MFU peak {args.peak_flops / 1e12 if args.peak_flops else '?'} TFLOP/s; TF32 matmuls "
          f"{torch.backends.cuda.matmul.allow_tf32}", flush=True)
    jobs = plan_jobs(args, {"stage1": s1.gradient_checkpointing, "stage2": s2.gradient_checkpointing})
    workers = args.workers or max(1, min(len(jobs), (multiprocessing.cpu_count() or 2) - 2))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {k: pool.submit(plan_job, job) for k, job in jobs.items()}
    if args.dry_run:
        for k, f in futures.items():
            plan = f.result()
            print(f"{k:>22}: estimate {plan['peak_bytes'] / GIB:.2f} GiB, "
                  f"{plan['flops_per_sample'] / 1e12:.3f} TFLOP per sample", flush=True)
        pool.shutdown()
        print(f"dry run: {len(jobs)} plans in {time.perf_counter() - t0:.0f}s")
        return 0
    print(f"{'':6} {'row':>14} {'s/step':>8} {'per second':>16} {'peak':>7} {'estimate':>8} {'MFU':>6}  (GiB)",
          flush=True)
    plans: dict[str, dict] = {}

    def collect(wait: bool) -> None:
        for k, f in futures.items():
            if k not in plans and (wait or f.done()):
                plans[k] = f.result()

    collect(False)
    rows = stage1_rows(args, dev, _Lazy(plans, collect), deadline)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if time.perf_counter() < deadline:
        rows += stage2_rows(args, dev, _Lazy(plans, collect))
    else:
        print("stage 2: skipped, out of time")
    pool.shutdown()
    print(f"total {time.perf_counter() - t0:.0f}s")
    write_result(args.out, {"device": name, "peak_flops": args.peak_flops, "rows": rows, "plans": plans})
    return 0


class _Lazy(dict):
    """The plans, waited for only when a row is printed (the workers plan while the GPU runs)."""

    def __init__(self, plans: dict, collect):
        super().__init__()
        self.plans, self.collect = plans, collect

    def get(self, key, default=None):
        if key not in self.plans:
            self.collect(True)
        return self.plans.get(key, default)


if __name__ == "__main__":
    sys.exit(main())
