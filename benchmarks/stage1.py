"""Shapes stage-1 benchmarks.

    python benchmarks/stage1.py speed [--teacher DIR] [--bf16] # online VAE vs cached latents (vs + cached vision,
                                                                # vs bf16), interleaved
    python benchmarks/stage1.py teachers --teachers shapes-teacher DIR  # one stage-1 step per teacher, interleaved
    python benchmarks/stage1.py accuracy --run RUN --teacher shapes-teacher --n 500
    python benchmarks/stage1.py ablation --data DIR --nq 16 32 77 --steps 2000 [--init shapes-stage1 --lr 2e-4]

speed: median step time of the stage-1 task with cached latents vs encoding images with the VAE each
step, alternating A/B steps in one process; the teacher's architecture matters, not its weights, so
without --teacher a random-init default shapes teacher is used.
teachers: the cost of distilling from each teacher: the recipe's step (cached latents, and cached vision features
where the recipe freezes DaViT) against each, each with its own encoder (z as wide as the teacher's T), steps
alternating in one process; median seconds, FLOPs per image, and each teacher's time over the first's.
accuracy: reconstruction scene accuracy / object F1 on test scenes, paper (DDPM 50) vs fast
(DPM-Solver++ 20) sampler, next to the teacher's own accuracy from the true captions.
ablation: trains one stage-1 run per Nq for the same number of steps, then measures each (Table 4-left);
with --init each starts from a trained encoder's first Nq queries (measured untrained as well).

speed and ablation train as the stage-1 recipe does (--recipe, default shapes: the encoder, its init,
the optimiser, schedule and timestep sampling); a flag overrides that one field, and a flag not given (its
default None) leaves the recipe's value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import adamw, flops, stage1_settings, test_scenes, train_config, write_result  # benchmarks/

from vlv.data.caches import posteriors, vision_rows
from vlv.data.images import to_tensor
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.shapes.metrics import reconstruction_scores, sample_accuracy
from vlv.training.recipes import load_recipe
from vlv.training.stage1 import Stage1Task, TensorRows, build_encoder

RECIPE = "shapes"


def _decoder(teacher: str | None) -> DiffusionDecoder:
    if teacher:
        return DiffusionDecoder.from_pretrained(teacher)
    from vlv.diffusion import make_pipeline
    from vlv.shapes.config import TeacherConfig
    from vlv.shapes.teacher import build_scheduler, build_text_encoder, build_unet, build_vae
    from vlv.shapes.tokenizers import build_tokenizer

    cfg = TeacherConfig()
    tok = build_tokenizer(cfg.max_length)
    pipe = make_pipeline(build_vae(cfg), build_text_encoder(cfg, tok), tok, build_unet(cfg), build_scheduler(cfg))
    return DiffusionDecoder(pipe)


def speed(args: argparse.Namespace) -> dict:
    """Interleaved A/B/(C) steps in one process: cached latents, online VAE, and with --bf16 cached + bf16 autocast."""
    recipe = load_recipe(args.recipe, "stage1")
    settings = stage1_settings(recipe, {"num_queries": args.nq})
    cfg = train_config(recipe, {"batch_size": args.batch_size})
    decoder = _decoder(args.teacher)
    data = test_scenes(512, decoder.image_size, split="train")
    enc = build_encoder(settings, decoder.text_dim, seed=0)
    opt = adamw((q for q in enc.parameters() if q.requires_grad), cfg)
    hnf = settings.high_noise_fraction
    cached = Stage1Task(enc, decoder, data, posteriors(decoder.vae, data), high_noise_fraction=hnf)
    variants = {"cached": (cached, False),
                "online": (Stage1Task(enc, decoder, data, None, high_noise_fraction=hnf), False)}
    if enc.vision_frozen:  # the recipe's DaViT is frozen: time the step that reads its cached features too
        feats = torch.cat([vision_rows(enc)(torch.from_numpy(data.images[i:i + 64]))["features"]
                           for i in range(0, len(data.images), 64)]).half()  # fp16, as the cache stores them
        variants["cached+vision"] = (Stage1Task(enc, decoder, data, posteriors(decoder.vae, data),
                                                high_noise_fraction=hnf, vision=TensorRows({"features": feats})),
                                     False)
    if getattr(decoder, "collapse_t5", False):  # SD3: the same step on the stock 256-position T5 context
        from vlv.decoders.sd3 import SD3Decoder

        best = list(variants)[-1]
        base = variants[best][0]
        stock = SD3Decoder(decoder.pipeline(), collapse_t5=False)
        variants[f"{best}, stock T5"] = (Stage1Task(enc, stock, data, base.latents, high_noise_fraction=hnf,
                                                    vision=base.vision), False)
    if args.bf16:
        variants["cached+bf16"] = (cached, True)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in range(len(names) * (args.steps + 1)):
        name = names[step % len(names)]
        task, bf16 = variants[name]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = task.loss(enc, task.batch(step, 0, cfg.batch_size, torch.device("cpu")),
                             torch.Generator().manual_seed(step)).mean
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(enc.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        if step >= len(names):  # one warm-up step each
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # The FLOP bound on the ratio: what the VAE encode adds to a cached step, counted on the first batch.
    b = cfg.batch_size
    batch = cached.batch(0, 0, b, torch.device("cpu"))

    def cached_step() -> None:
        cached.loss(enc, batch, torch.Generator().manual_seed(0)).mean.backward()
        opt.zero_grad()

    step_flops = flops(cached_step)
    vae_flops = flops(lambda: decoder.latents(to_tensor(data.images[:b])))
    bound = (step_flops + vae_flops) / step_flops
    nq = settings.num_queries
    out = {"recipe": recipe["name"], "batch_size": b, "nq": nq, "steps_each": args.steps,
           "threads": torch.get_num_threads(),
           "flops_per_image": {"cached_step": step_flops / b, "vae_encode": vae_flops / b},
           "flop_bound_speedup": round(bound, 3),
           **{f"{k}_s": round(v, 4) for k, v in med.items()},
           "speedup": round(med["online"] / med["cached"], 3)}
    if "cached+vision" in med:
        out["vision_cache_speedup"] = round(med["cached"] / med["cached+vision"], 3)
    stock_t5 = next((k for k in med if k.endswith(", stock T5")), None)
    if stock_t5:
        out["collapsed_t5_speedup"] = round(med[stock_t5] / med[stock_t5.removesuffix(", stock T5")], 3)
    if args.bf16:
        out["bf16_speedup"] = round(med["cached"] / med["cached+bf16"], 3)
    print(f"stage-1 step, batch {b}, Nq {nq}, {torch.get_num_threads()} threads, median of "
          f"{args.steps} interleaved steps each:")
    print(f"  online VAE encode: {med['online']:.3f} s   cached latents: {med['cached']:.3f} s   "
          f"speed-up {out['speedup']:.2f}x (FLOP bound {bound:.3f}x: the VAE encode adds "
          f"{vae_flops / b / 1e9:.2f} GFLOP per image to a {step_flops / b / 1e9:.2f} "
          f"GFLOP step)")
    if "cached+vision" in med:
        print(f"  cached latents + cached vision features (no DaViT in the step): {med['cached+vision']:.3f} s   "
              f"speed-up over cached latents alone {out['vision_cache_speedup']:.2f}x")
    if stock_t5:
        print(f"  {stock_t5}: {med[stock_t5]:.3f} s   the T5 part collapsed to one key is "
              f"{out['collapsed_t5_speedup']:.2f}x faster")
    if args.bf16:
        print(f"  cached latents + bf16 autocast: {med['cached+bf16']:.3f} s   speed-up over fp32 "
              f"{out['bf16_speedup']:.2f}x")
    return out


def teachers(args: argparse.Namespace) -> dict:
    recipe = load_recipe(args.recipe, "stage1")
    settings = stage1_settings(recipe, {"num_queries": args.nq})
    cfg = train_config(recipe, {"batch_size": args.batch_size})
    b = cfg.batch_size
    setups = []
    for teacher in args.teachers:
        decoder = DiffusionDecoder.from_pretrained(teacher)
        data = test_scenes(4 * b, decoder.image_size, split="train")
        enc = build_encoder(settings, decoder.text_dim, seed=0)
        vision = None
        if enc.vision_frozen:  # as a run caches them: DaViT out of the step
            vision = TensorRows({"features": torch.cat([vision_rows(enc)(torch.from_numpy(data.images[i:i + 64]))[
                "features"] for i in range(0, len(data.images), 64)]).half()})
        task = Stage1Task(enc, decoder, data, posteriors(decoder.vae, data),
                          high_noise_fraction=settings.high_noise_fraction, vision=vision)
        opt = adamw((q for q in enc.parameters() if q.requires_grad), cfg)
        setups.append((teacher, decoder, enc, task, opt))
    times: dict[str, list[float]] = {t: [] for t in args.teachers}
    for step in range(len(setups) * (args.steps + 1)):
        teacher, _, enc, task, opt = setups[step % len(setups)]
        t = time.perf_counter()
        task.loss(enc, task.batch(step, 0, b, torch.device("cpu")), torch.Generator().manual_seed(step)).mean.backward()
        opt.step()
        opt.zero_grad()
        if step >= len(setups):  # one warm-up step each
            times[teacher].append(time.perf_counter() - t)
    first = args.teachers[0]
    out = {"recipe": recipe["name"], "batch_size": b, "nq": settings.num_queries, "steps_each": args.steps,
           "threads": torch.get_num_threads(), "teachers": {}}
    print(f"stage-1 step, batch {b}, Nq {settings.num_queries}, {torch.get_num_threads()} threads, median of "
          f"{args.steps} interleaved steps each:")
    for teacher, decoder, enc, task, opt in setups:
        batch = task.batch(0, 0, b, torch.device("cpu"))

        def step_once(task=task, enc=enc, batch=batch, opt=opt) -> None:
            task.loss(enc, batch, torch.Generator().manual_seed(0)).mean.backward()
            opt.zero_grad()

        med = statistics.median(times[teacher])
        row = {"family": decoder.family.name, "text_dim": decoder.text_dim, "step_s": round(med, 4),
               "flops_per_image": flops(step_once) / b,
               "denoiser_params": sum(p.numel() for p in decoder.denoiser.parameters()),
               "relative": round(med / statistics.median(times[first]), 3)}
        out["teachers"][teacher] = row
        print(f"  {teacher} ({row['family']}, z {row['text_dim']} wide, denoiser {row['denoiser_params'] / 1e6:.1f} "
              f"M): {med:.3f} s, {row['flops_per_image'] / 1e9:.2f} GFLOP per image, {row['relative']:.2f}x the "
              f"first's time")
    return out


def accuracy(args: argparse.Namespace) -> dict:
    decoder = _decoder(args.teacher)
    test = test_scenes(args.n, decoder.image_size)
    torch.set_grad_enabled(False)
    out: dict = {"n": args.n}
    t = sample_accuracy(decoder.pipeline("fast"), test.captions, guidance_scale=args.cfg)
    out["teacher_true_captions"] = t.as_dict()
    print(f"teacher from true captions (fast, cfg {args.cfg}): scene acc {t.scene_accuracy:.4f} F1 {t.object_f1:.4f}")
    for run in args.run:
        enc = VLVEncoder.from_pretrained(run).eval()
        for sampler in args.samplers:
            t0 = time.perf_counter()
            s = reconstruction_scores(enc, decoder, test, sampler=sampler, guidance_scale=args.cfg)
            out[f"{run}:{sampler}"] = {**s.as_dict(), "seconds": round(time.perf_counter() - t0, 1),
                                       "ratio_to_teacher": s.scene_accuracy / max(t.scene_accuracy, 1e-9)}
            print(f"{run} [{sampler}]: scene acc {s.scene_accuracy:.4f} F1 {s.object_f1:.4f} "
                  f"({s.scene_accuracy / max(t.scene_accuracy, 1e-9):.1%} of the teacher) "
                  f"{time.perf_counter() - t0:.0f}s")
    return out


def ablation(args: argparse.Namespace) -> dict:
    """One stage-1 run per Nq, equal steps: from scratch (the paper's Table 4-left), or with --init from a trained
    encoder's first Nq queries, whose z is exactly the first Nq positions of the trained z (the query decoder is
    causal); that truncation is then measured untrained too, as the runs' common starting point."""
    from vlv.training.checkpoint import load_checkpoint
    from vlv.training.recipes import resolved
    from vlv.training.stage1 import train_stage1

    recipe = load_recipe(args.recipe, "stage1")
    cfg = train_config(recipe, {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                "warmup_steps": args.warmup, "max_minutes": args.minutes})
    method = {"init": args.init, "high_noise_fraction": args.high_noise_fraction}
    decoder = _decoder(args.teacher)
    test = test_scenes(args.n, decoder.image_size)
    results: dict[str, dict] = {}

    def measure(name: str, enc: VLVEncoder, extra: dict) -> None:
        with torch.no_grad():
            s = reconstruction_scores(enc.eval(), decoder, test, sampler="fast", guidance_scale=args.cfg)
        results[name] = {**s.as_dict(), **extra}
        print(f"{name}: scene acc {s.scene_accuracy:.4f} F1 {s.object_f1:.4f} {extra}", flush=True)

    if args.init:
        from vlv.training.stage1 import init_from

        for nq in args.nq:
            enc = build_encoder(stage1_settings(recipe, {"num_queries": nq}), decoder.text_dim, seed=0)
            init_from(enc, args.init)
            measure(f"Nq {nq}, untrained from {args.init}", enc, {"steps": 0})
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = args.data
        else:
            from vlv.shapes.data import write_shapes

            data = write_shapes(Path(tmp) / "train", n=args.train_n, progress=False)
        for nq in args.nq:
            run = Path(args.out) / f"nq{nq}"
            settings = stage1_settings(recipe, {**method, "num_queries": nq}, decoder=args.teacher, data=str(data))
            enc = train_stage1(settings, cfg, run, recipe=resolved(recipe, train=cfg))
            if enc is None:  # stopped by the time cap: measure the checkpoint
                enc = build_encoder(settings, decoder.text_dim, seed=cfg.seed)
                load_checkpoint(run, enc, None, None)
            done = json.loads((run / "checkpoint" / "trainer.json").read_text())  # resumed runs count in full
            measure(f"Nq {nq}", enc, {"steps": done["step"], "train_s": round(done["elapsed_s"])})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    recipe_help = f"stage-1 recipe (vlv/recipes/stage1) or JSON file whose settings the runs take (default {RECIPE})"
    s = sub.add_parser("speed")
    s.add_argument("--teacher", default=None)
    s.add_argument("--recipe", default=RECIPE, help=recipe_help)
    s.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    s.add_argument("--nq", type=int, default=None, help="default: the recipe's")
    s.add_argument("--steps", type=int, default=10, help="timed steps of each variant")
    s.add_argument("--bf16", action="store_true", help="also time cached-latent steps under bf16 autocast")
    s.set_defaults(func=speed)
    t = sub.add_parser("teachers")
    t.add_argument("--teachers", nargs="+", required=True, help="teacher dirs or shipped names; ratios to the first")
    t.add_argument("--recipe", default=RECIPE, help=recipe_help)
    t.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    t.add_argument("--nq", type=int, default=None, help="default: the recipe's")
    t.add_argument("--steps", type=int, default=10, help="timed steps of each teacher")
    t.set_defaults(func=teachers)
    a = sub.add_parser("accuracy")
    a.add_argument("--run", nargs="+", required=True)
    a.add_argument("--teacher", default="shapes-teacher")
    a.add_argument("--n", type=int, default=500)
    a.add_argument("--cfg", type=float, default=2.0)
    a.add_argument("--samplers", nargs="+", default=["fast", "paper"])
    a.set_defaults(func=accuracy)
    b = sub.add_parser("ablation")
    b.add_argument("--teacher", default="shapes-teacher")
    b.add_argument("--recipe", default=RECIPE, help=recipe_help)
    b.add_argument("--nq", type=int, nargs="+", default=[16, 32, 77])
    b.add_argument("--init", default=None, help="start each run from this trained encoder's first Nq queries")
    b.add_argument("--data", default=None, help="training image-caption dir (default: --train-n fresh scenes)")
    b.add_argument("--train-n", type=int, default=10000)
    b.add_argument("--steps", type=int, default=None, help="steps per run, equal for every Nq (default: the recipe's)")
    b.add_argument("--minutes", type=float, default=None, help="also stop a run after this long")
    b.add_argument("--batch-size", type=int, default=64, help="default 64, the recorded ablations' batch")
    b.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    b.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the recipe's)")
    b.add_argument("--high-noise-fraction", type=float, default=None, help="default: the recipe's")
    b.add_argument("--n", type=int, default=500)
    b.add_argument("--cfg", type=float, default=2.0)
    b.add_argument("--out", default="runs/benchmarks/nq-ablation")
    b.set_defaults(func=ablation)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    write_result(args.json, args.func(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
