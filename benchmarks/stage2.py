"""Shapes stage-2 benchmarks.

    python benchmarks/stage2.py accuracy --run RUN2 --n 500            # captions, and caption -> teacher (Table 1)
    python benchmarks/stage2.py levels --stage1 RUN1 --lm LM --data DIR --minutes 5  # Table 4-right analogue
    python benchmarks/stage2.py levels ... --levels mlp+llm mlp+lora16                # LoRA (peft) adapters, rank 16
    python benchmarks/stage2.py table7 --stage1 RUN1 --lm LM --data DIR --minutes 5  # stage-1 vs untrained encoder
    python benchmarks/stage2.py speed --run RUN2 --n 64                 # batched vs batch-1 captioning
    python benchmarks/stage2.py cache --data DIR --steps 10             # steps with / without the text_embeds cache

accuracy: caption scene accuracy / object F1 / attribute accuracy (grammar read-back) on test scenes,
greedy and beam search, then the predicted captions drawn by the teacher and read back by the detector.
levels / table7: one stage-2 run per variant for the same wall time on the same data, each measured on
the same test scenes. The runs train as the stage-2 recipe does (--recipe, default shapes), except for
ABLATION_TRAIN below (the settings the recorded levels / table7 ablations ran with); a flag overrides one field.
table7's untrained encoder is a fresh encoder as the shapes-stage1 recipe builds one.
cache: the one-off build of the c = T(E(x)) cache over DIR (an image-caption folder), then stage-2 steps at the
demo's settings read from it and from the images (E and T run), interleaved in one process, medians; and the
loss change if the cache stored fp16.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import fresh_encoder, test_scenes, train_config, write_result  # benchmarks/

from vlv.captioner import Captioner
from vlv.inference import caption_images
from vlv.shapes import world
from vlv.shapes.metrics import caption_scores, image_scores, truths
from vlv.training.config import Stage2Settings
from vlv.training.recipes import load_recipe, resolved, section
from vlv.training.stage2 import train_stage2

RECIPE = "shapes"
# What the recorded levels / table7 ablations trained with instead of the recipe's values, kept as overrides so
# that the benchmark measures what they measured; --lr and --batch-size go on top.
ABLATION_TRAIN = {"lr": 5e-4, "betas": (0.9, 0.99), "warmup_steps": 20}


def accuracy(args: argparse.Namespace) -> dict:
    from vlv.diffusion import load_pipeline, sample
    from vlv.shipped import resolve_decoder

    captioner = Captioner.from_pretrained(args.run).eval()
    data = test_scenes(args.n, captioner.encoder.config.image_size)
    pipe = load_pipeline(resolve_decoder(args.teacher))
    true = truths(data)
    out: dict = {"n": args.n}
    for beams in args.beams:
        t = time.perf_counter()
        preds = caption_images(captioner, data.images, num_beams=beams)
        dt = time.perf_counter() - t
        s = world.score([world.parse_caption(p) for p in preds], true).as_dict()
        s["exact"] = float(np.mean([p == c for p, c in zip(preds, data.captions, strict=True)]))
        s["seconds"] = round(dt, 1)
        drawn = sample(pipe, preds, guidance_scale=args.cfg, steps=20)
        s["caption_to_image"] = image_scores(drawn, data).as_dict()
        out[f"beams{beams}"] = s
        print(f"beams {beams}: caption scene acc {s['scene_accuracy']:.4f}, object F1 {s['object_f1']:.4f}, attribute "
              f"acc {s['attribute_accuracy']:.4f}, exact {s['exact']:.4f} ({dt:.1f}s); caption -> teacher -> "
              f"detector: scene acc {s['caption_to_image']['scene_accuracy']:.4f}", flush=True)
    return out


def _train_variant(tag: str, args: argparse.Namespace, encoder: str, trainable: str, lora_rank: int,
                   work: Path) -> dict:
    """One budgeted stage-2 run of the recipe (ABLATION_TRAIN and the flags on top), measured greedily."""
    from vlv.lm import is_lm_dir

    recipe = load_recipe(args.recipe, "stage2")
    settings = section(recipe, "settings", Stage2Settings, {"trainable": trainable, "lora_rank": lora_rank},
                       decoder=args.teacher, encoder=encoder, lm=args.lm, data=str(args.data))
    cfg = replace(train_config(recipe, ABLATION_TRAIN, {"lr": args.lr, "batch_size": args.batch_size},
                               {"budget_minutes": args.minutes, "seed": args.seed}), steps=None)  # it plans its steps
    tokenizer = None
    if not is_lm_dir(settings.lm):  # a random-init LM config: the shapes world's tokenizer
        from vlv.shapes.tokenizers import build_shapes_tokenizer

        tokenizer = build_shapes_tokenizer()
    t = time.perf_counter()
    captioner = train_stage2(settings, cfg, work / tag, tokenizer=tokenizer, recipe=resolved(recipe, train=cfg))
    wall = time.perf_counter() - t
    meta = json.loads((work / tag / "checkpoint" / "trainer.json").read_text())
    data = test_scenes(args.n, captioner.encoder.config.image_size)
    s = caption_scores(captioner.eval(), data, num_beams=1)
    s.update(steps=meta["step"], train_s=round(wall, 1))
    print(f"{tag:>28}: scene acc {s['scene_accuracy']:.4f}, object F1 {s['object_f1']:.4f}, exact "
          f"{s['caption_exact']:.4f} after {s['steps']} steps / {wall:.0f}s", flush=True)
    return s


def _level(tag: str) -> tuple[str, int]:
    """A levels variant: mlp | mlp+llm | mlp+llm+encoder, or mlp+loraR[+encoder] (mlp+llm with rank-R LoRA)."""
    m = re.fullmatch(r"mlp(?:\+(llm|lora(\d+)))?(\+encoder)?", tag)
    if m is None or (m.group(3) and not m.group(1)):
        raise argparse.ArgumentTypeError(f"{tag!r}: expected mlp, mlp+llm, mlp+llm+encoder or mlp+loraR[+encoder]")
    return ("mlp" if not m.group(1) else "mlp+llm" + (m.group(3) or "")), int(m.group(2) or 0)


def _level_tag(tag: str) -> str:
    _level(tag)  # fails at parse time, before any training
    return tag


def levels(args: argparse.Namespace) -> dict:
    """One run per trainable level (mlp+loraR: the llm levels with rank-R LoRA adapters in the LLM)."""
    with tempfile.TemporaryDirectory() as tmp:
        return {tag: _train_variant(tag, args, str(args.stage1), *_level(tag), Path(tmp)) for tag in args.levels}


def table7(args: argparse.Namespace) -> dict:
    from vlv.encoder import VLVEncoder

    stage1 = VLVEncoder.from_pretrained(args.stage1)
    with tempfile.TemporaryDirectory() as tmp:
        untrained = Path(tmp) / "untrained-encoder"
        fresh_encoder(stage1.config.text_dim, stage1.config.num_queries, seed=args.seed).save_pretrained(untrained)
        return {"stage1-encoder": _train_variant("stage-1 encoder", args, str(args.stage1), args.level, 0, Path(tmp)),
                "untrained-encoder": _train_variant("untrained encoder", args, str(untrained), args.level, 0,
                                                    Path(tmp))}


def speed(args: argparse.Namespace) -> dict:
    captioner = Captioner.from_pretrained(args.run).eval()
    data = test_scenes(args.n, captioner.encoder.config.image_size)
    x = data.images  # (n, H, W, 3) uint8
    caption_images(captioner, x[:2], num_beams=1)  # warm-up
    t = time.perf_counter()
    batched = caption_images(captioner, x, batch_size=args.n, num_beams=1)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [caption_images(captioner, x[i : i + 1], batch_size=1, num_beams=1)[0] for i in range(args.n)]
    t_single = time.perf_counter() - t
    same = float(np.mean([a == b for a, b in zip(batched, single, strict=True)]))
    out = {"n": args.n, "batched_caps_per_s": round(args.n / t_batched, 2),
           "batch1_caps_per_s": round(args.n / t_single, 2), "speedup": round(t_single / t_batched, 2),
           "same_captions": same}
    print(f"greedy captioning of {args.n} images: batched {out['batched_caps_per_s']} captions/s, batch-1 loop "
          f"{out['batch1_caps_per_s']} captions/s: {out['speedup']}x; identical captions {same:.0%}")
    return out


def cache(args: argparse.Namespace) -> dict:
    """Build time of the text_embeds cache over ``--data``, then interleaved training steps (batch, backward, clip,
    AdamW as the loop takes them) reading the images or the cache, one captioner each from the same seed."""
    from accelerate import PartialState

    from vlv.data.caches import Cache
    from vlv.data.datasets import open_dataset
    from vlv.shapes.tokenizers import tokenizer_for
    from vlv.training.caches import build_cache
    from vlv.training.stage2 import Stage2Task, build_captioner

    settings = Stage2Settings(decoder=args.teacher, encoder=args.stage1, lm=args.lm, data=str(args.data),
                              trainable=args.level)
    b, device, data = args.batch_size, torch.device("cpu"), open_dataset(args.data)
    caps = {k: build_captioner(settings, 0, tokenizer_for(settings.lm)).train() for k in ("images", "cached")}
    size = caps["cached"].encoder.config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_cache("text_embeds", tmp, data, size, PartialState(), encoder=caps["cached"].encoder,
                    text_encoder=caps["cached"].text_encoder, batch_size=b, num_workers=args.num_workers,
                    progress=False)
        build_s = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in Path(tmp).iterdir())
        rows = Cache(tmp)
        tasks = {"images": Stage2Task(caps["images"], data, num_workers=args.num_workers),
                 "cached": Stage2Task(caps["cached"], data, text_embeds=rows)}
        opts = {k: torch.optim.AdamW([q for q in c.parameters() if q.requires_grad], lr=5e-4) for k, c in caps.items()}
        times: dict[str, list[float]] = {k: [] for k in tasks}
        for step in range(args.steps + 1):  # one warm-up step each
            for name, task in tasks.items():
                cap, t = caps[name], time.perf_counter()
                task.loss(cap, task.batch(step, 0, b, device), None).mean.backward()
                torch.nn.utils.clip_grad_norm_([q for q in cap.parameters() if q.requires_grad], 1.0)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                if step:
                    times[name].append(time.perf_counter() - t)
        batch = tasks["cached"].batch(0, 0, b, device)
        cap = caps["cached"].eval()
        with torch.no_grad():
            exact = cap(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        text_embeds=batch["text_embeds"]).loss
            half = cap(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       text_embeds=batch["text_embeds"].half().float()).loss
        tasks["images"].close()
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(data)
    out = {"samples": n, "batch_size": b, "level": args.level, "steps_each": args.steps,
           "threads": torch.get_num_threads(), "num_workers": args.num_workers,
           "images_step_s": round(med["images"], 4), "cached_step_s": round(med["cached"], 4),
           "speedup": round(med["images"] / med["cached"], 3), "build_s": round(build_s, 1),
           "build_s_per_10k": round(build_s * 10_000 / n, 1), "cache_mb": round(disk / 2**20, 1),
           "fp16_loss_change": abs(half.item() - exact.item()) / exact.item()}
    print(f"stage-2 step at {args.level}, batch {b}, {out['threads']} threads, {args.num_workers} decoding "
          f"workers, median of {args.steps} interleaved steps each:")
    print(f"  images (E and T run): {med['images']:.3f} s   cached c: {med['cached']:.3f} s   "
          f"speed-up {out['speedup']:.2f}x")
    print(f"  cache build over {n} images: {build_s:.1f} s ({out['build_s_per_10k']:.0f} s per 10,000), "
          f"{out['cache_mb']:.0f} MiB fp32; fp16 rows would move the first batch's loss by "
          f"{out['fp16_loss_change']:.2e} (relative)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--run", required=True, help="stage-2 run dir or shipped name (shapes-stage2)")
    a.add_argument("--teacher", default="shapes-teacher")
    a.add_argument("--n", type=int, default=500)
    a.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    a.add_argument("--cfg", type=float, default=2.0)
    for name in ("levels", "table7"):
        t = sub.add_parser(name)
        t.add_argument("--stage1", required=True, help="stage-1 run dir or shipped name (shapes-stage1)")
        t.add_argument("--lm", required=True, help="LM dir, shipped name (shapes-lm) or LM config (random init)")
        t.add_argument("--data", type=Path, required=True)
        t.add_argument("--teacher", default="shapes-teacher")
        t.add_argument("--recipe", default=RECIPE,
                       help=f"stage-2 recipe (vlv/recipes/stage2) or JSON file the runs train by (default {RECIPE})")
        t.add_argument("--minutes", type=float, default=5.0, help="training wall time of each variant")
        t.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
        t.add_argument("--lr", type=float, default=None,
                       help=f"peak learning rate (default {ABLATION_TRAIN['lr']}: ABLATION_TRAIN's, not the recipe's)")
        t.add_argument("--n", type=int, default=500)
        t.add_argument("--seed", type=int, default=0)
        if name == "table7":
            t.add_argument("--level", default="mlp+llm+encoder", help="the trainable level of both runs")
        else:
            t.add_argument("--levels", nargs="+", type=_level_tag, default=["mlp", "mlp+llm", "mlp+llm+encoder"],
                           help="variants: mlp, mlp+llm, mlp+llm+encoder, mlp+loraR, mlp+loraR+encoder")
    c = sub.add_parser("cache")
    c.add_argument("--data", type=Path, required=True, help="image-caption folder (e.g. vlv data shapes --n 1000)")
    c.add_argument("--stage1", default="shapes-stage1")
    c.add_argument("--lm", default="shapes-lm")
    c.add_argument("--teacher", default="shapes-teacher")
    c.add_argument("--level", default="mlp+llm", choices=["mlp", "mlp+llm"])
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--steps", type=int, default=10, help="timed steps of each variant")
    c.add_argument("--num-workers", type=int, default=0,
                   help="decoding workers of the image variant and the build (0: decoding counts in the step)")
    s = sub.add_parser("speed")
    s.add_argument("--run", required=True, help="stage-2 run dir or shipped name (shapes-stage2)")
    s.add_argument("--n", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    write_result(args.json, {"accuracy": accuracy, "levels": levels, "table7": table7, "speed": speed,
                                 "cache": cache}[args.cmd](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
