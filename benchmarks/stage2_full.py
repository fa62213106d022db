"""Full-scale stage 2 with random weights: SD 2.1-base's CLIP text encoder T -> psi -> Qwen2.5-3B, exact configs.

    python benchmarks/stage2_full.py --device cpu --levels mlp --batch-sizes 1
    python benchmarks/stage2_full.py --device cuda --levels mlp mlp+llm --batch-sizes 8 32 --precision bf16
    python benchmarks/stage2_full.py --device cpu --levels mlp+lora --lora-rank 16   # LoRA adapters in the LLM
    python benchmarks/stage2_full.py --sharding ddp fsdp2 --processes 2 --lm qwen2-shapes --text-encoder shapes-teacher
    python benchmarks/stage2_full.py --device cuda --sharding ddp fsdp2 --processes 8 --batch-sizes 8 \
        --precision bf16 --gradient-checkpointing          # Qwen2.5-3B at level mlp+llm, one node

One optimizer step of the captioner's loss on z-shaped inputs (B, 77, 1024) and captions of --caption-tokens
tokens: per level, batch size and precision it prints seconds per step, captions/s and peak memory. The
stage-1 encoder is not in the loop (levels mlp and mlp+llm read z; the encoder level adds stage 1's
encoder cost, measured by stage1_full.py). AdamW as the stage2/paper recipe sets it (lr, betas, weight decay)
over the trainable set, fp32 master weights; unlike the recipe (TIMED_* below) the step runs without gradient
clipping, in fp32 and without gradient checkpointing unless --precision bf16 / --gradient-checkpointing. At level
mlp+llm that is ~16 bytes x 3.1 B parameters (~49 GB) before activations; level mlp+lora (mlp+llm with
peft LoRA adapters of --lora-rank in every projection) keeps the 3.1 B base weights frozen (~12 GB in fp32).
Peak memory on the CPU is the process's peak RSS: run one level per process to compare levels.

With ``--sharding`` the script launches itself under torchrun (``--processes``) once per mode, at level mlp+llm, and
each rank reports the bytes it holds of the trainable weights, their gradients and AdamW's state, and its peak
memory: ``ddp`` replicates all of them, ``fsdp2`` / ``zero2`` shard them with vlv's own ``vlv.training.sharding``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from common import adamw, given, peak_memory_gib, time_steps, train_config  # benchmarks/

from vlv.captioner import Captioner
from vlv.config import CaptionerConfig
from vlv.diffusion import random_pipeline
from vlv.shapes.tokenizers import build_shapes_tokenizer, build_tokenizer
from vlv.training.config import Stage2Settings
from vlv.training.recipes import load_recipe, section

RECIPE, LM = "paper", "qwen2.5-3b"  # the paper's LLM, random init from its config in vlv/configs
# What this benchmark has always timed, kept over the recipe's bf16 autocast, clipping and gradient checkpointing.
TIMED_TRAIN = {"mixed_precision": "no", "grad_clip": 0.0}
TIMED_SETTINGS = {"gradient_checkpointing": False}


def train_step(captioner: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float, ids: torch.Tensor,
               mask: torch.Tensor, z: torch.Tensor, precision: str, _step: int) -> None:
    """One optimizer step of the captioner's loss over its trainable set."""
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = captioner(input_ids=ids, attention_mask=mask, z=z).loss
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([q for q in captioner.parameters() if q.requires_grad], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------- sharded memory
def _held_bytes(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of the trainable weights, their gradients and the optimizer state (local shards)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    return {"weights": size(params), "grads": size([p.grad for p in params if p.grad is not None]),
            "optimizer": size(state)}


def sharded_child(args: argparse.Namespace) -> None:
    """One rank of a --sharding run: build, wrap as the mode says, train a few steps, report what it holds."""
    import torch.distributed as dist

    from vlv.text_encoder import load_text_encoder
    from vlv.training import sharding

    mode = args.child_sharding
    dev = torch.device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(0)
    if args.text_encoder == "sd21-base":
        text_encoder = random_pipeline(build_tokenizer()).text_encoder
    else:
        from vlv.shipped import resolve_decoder

        text_encoder = load_text_encoder(resolve_decoder(args.text_encoder))
    text_encoder.requires_grad_(False).eval()
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, lm=args.lm, trainable="mlp+llm")
    captioner = Captioner(config, text_encoder, tokenizer=build_shapes_tokenizer()).to(dev)
    if args.gradient_checkpointing:
        captioner.lm.activation_checkpointing_enable()
    precision = (args.precision or ["fp32"])[0]
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(captioner, device_ids=[dev] if dev.type == "cuda" else None)
    else:
        policy = sharding.precision_policy("bf16" if precision == "bf16" else "no")
        model = sharding.shard(captioner, sharding.mesh_for(dev), policy, reshard_after_forward=mode == "fsdp2")
    params = [q for q in captioner.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    b, vocab = args.batch_sizes[0], captioner.lm.config.vocab_size
    z = torch.randn(b, args.nq, text_encoder.config.hidden_size, device=dev)
    ids = torch.randint(3, vocab - 3, (b, args.caption_tokens), device=dev)
    step = partial(train_step, model, opt, 0.0, ids, torch.ones_like(ids), z, precision)  # no clipping
    times = time_steps(step, args.steps, dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), z=z).loss.backward()  # gradients held, as mid-step
    row = {"mode": mode, "rank": dist.get_rank(), "s_per_step": sum(times) / len(times),
           "peak_gib": peak_memory_gib(dev), "trainable": sum(q.numel() for q in params), **_held_bytes(params, opt)}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def sharded_main(args: argparse.Namespace, argv: list[str]) -> int:
    """Each --sharding mode under torchrun; a table of per-rank bytes, and each mode's share of DDP's."""
    rest = [a for a in argv if a not in args.sharding]
    i = rest.index("--sharding")
    rest = rest[:i] + rest[i + 1 :]
    results = {}
    for mode in args.sharding:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.processes), __file__, *rest, "--child-sharding", mode]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{'mode':>6} {'rank':>4} {'weights MiB':>11} {'grads MiB':>9} {'AdamW MiB':>9} {'peak GiB':>8} "
          f"{'s/step':>7}")
    for mode, rows in results.items():
        for row in rows:
            print(f"{mode:>6} {row['rank']:>4} {row['weights'] / 2**20:>11.2f} {row['grads'] / 2**20:>9.2f} "
                  f"{row['optimizer'] / 2**20:>9.2f} {row['peak_gib']:>8.2f} {row['s_per_step']:>7.3f}")
    if "ddp" in results:
        ddp = results["ddp"][0]
        for mode, rows in results.items():
            held = max(r["weights"] + r["grads"] + r["optimizer"] for r in rows)
            print(f"{mode}: the largest rank holds {held / (ddp['weights'] + ddp['grads'] + ddp['optimizer']):.3f}"
                  f" of DDP's weight + gradient + optimizer bytes on {args.processes} processes")
    if args.out:
        from common import write_result

        write_result(args.out, {"processes": args.processes, "lm": args.lm, "results": results})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", default=RECIPE, help=f"stage-2 recipe or JSON file (default {RECIPE})")
    p.add_argument("--levels", nargs="+", default=["mlp"], choices=["mlp", "mlp+llm", "mlp+lora"])
    p.add_argument("--lora-rank", type=int, default=16, help="adapter rank of level mlp+lora")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: TIMED_TRAIN's mixed precision (fp32)")
    p.add_argument("--caption-tokens", type=int, default=32, help="caption length in LM tokens (+ EOS)")
    p.add_argument("--nq", type=int, default=77)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute the LLM's activations (the recipe does; default here: off)")
    p.add_argument("--sharding", nargs="+", choices=["ddp", "fsdp2", "zero2"], default=None,
                   help="compare these modes on --processes processes (torchrun) at level mlp+llm")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--lm", default=LM, help=f"LM config name or dir (default {LM})")
    p.add_argument("--text-encoder", default="sd21-base", help="sd21-base (random init) or a shipped decoder's T")
    p.add_argument("--out", type=Path, default=None, help="results JSON (--sharding)")
    p.add_argument("--child-sharding", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.child_sharding:
        sharded_child(args)
        return 0
    if args.sharding:
        return sharded_main(args, argv)
    dev = torch.device(args.device)
    recipe = load_recipe(args.recipe, "stage2")
    cfg = train_config(recipe, TIMED_TRAIN)
    settings = section(recipe, "settings", Stage2Settings,
                       given(TIMED_SETTINGS, {"gradient_checkpointing": args.gradient_checkpointing}),
                       decoder="sd21-base (random init)", encoder="", lm=args.lm, data="")
    precisions = args.precision or [{"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)]
    torch.manual_seed(0)
    text_encoder = random_pipeline(build_tokenizer()).text_encoder.requires_grad_(False).eval().to(dev)
    tokenizer = build_shapes_tokenizer()  # the random-init LM has none; the step reads only its eos / pad ids
    d_t = text_encoder.config.hidden_size
    print(f"{'level':>8} {'precision':>9} {'batch':>5} {'s/step':>8} {'capt/s':>8} {'peak GiB':>9} {'trainable':>10}")
    for level in args.levels:
        t0 = time.perf_counter()
        lora = args.lora_rank if level == "mlp+lora" else 0
        config = CaptionerConfig(text_dim=d_t, lm=settings.lm, trainable="mlp+llm" if lora else level, lora_rank=lora,
                                 max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams)
        captioner = Captioner(config, text_encoder, tokenizer=tokenizer).to(dev)
        if settings.gradient_checkpointing:
            captioner.lm.activation_checkpointing_enable()
        params = [q for q in captioner.parameters() if q.requires_grad]
        n_train = sum(q.numel() for q in params)
        n_lm = sum(q.numel() for q in captioner.lm.parameters())
        print(f"# level {level}: built in {time.perf_counter() - t0:.0f}s; LM {n_lm / 1e9:.2f} B parameters",
              flush=True)
        opt = adamw(params, cfg)
        vocab = captioner.lm.config.vocab_size
        for precision in precisions:
            for b in args.batch_sizes:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                z = torch.randn(b, args.nq, d_t, device=dev)
                ids = torch.randint(10, vocab - 10, (b, args.caption_tokens), device=dev)
                mask = torch.ones_like(ids)
                step = partial(train_step, captioner, opt, cfg.grad_clip, ids, mask, z, precision)
                times = time_steps(step, args.steps, dev)
                s = sum(times) / len(times)
                print(f"{level:>8} {precision:>9} {b:>5} {s:>8.3f} {b / s:>8.2f} {peak_memory_gib(args.device):>9.1f}"
                      f" {n_train / 1e6:>9.1f}M", flush=True)
        del captioner, opt
    return 0


if __name__ == "__main__":
    sys.exit(main())
