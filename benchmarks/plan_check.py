"""Does ``vlv plan`` predict a training step's memory? Its estimate against the measured peak of a real step, on a CPU.

    python benchmarks/plan_check.py                      # every row (~3 min on 2 cores)
    python benchmarks/plan_check.py --rows stage1-shapes stage2-mid --out benchmarks/results/plan_check.json

Each row is one paper recipe (read from vlv/recipes/<stage>/paper.json when the script runs: trainable set,
precision, gradient checkpointing, caches, clipping, AdamW) on reduced architectures of the paper's models, at a
batch that fits this machine, on one process: the shapes configs (Florence-2, SD and Qwen2 as the shapes world
shrinks them), and a mid size (Florence-2, SD 2.1 and Qwen2.5 scaled down here: ``MID``).

- estimate: ``vlv.training.plan`` (meta device, fake tensors, torch's MemTracker) for a CPU target (the CPU's
  AdamW, without foreach temporaries), run in this process;
- measured: a fresh process builds the same modules with random weights and takes two real optimizer steps of the
  task's own loss; the peak resident set of the second (VmHWM, reset after the first) minus the resident set
  before the models were built. glibc's mmap threshold is fixed, so a freed tensor leaves the resident set at once.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import write_result  # benchmarks/

GIB = 2**30
ROWS = ("stage1-shapes", "stage1-mid", "stage2-shapes", "stage2-mid")  # STAGE-SIZE[:SHARDINGxN] (default: ddp x1)
BATCH = {"stage1-shapes": 128, "stage1-mid": 6, "stage2-shapes": 64, "stage2-mid": 4}
OVERRIDES: dict[str, dict] = {"stage1": {}, "stage2": {}, "train": {}}  # --stage1-settings, --stage2-settings, --train


def parse_row(row: str) -> tuple[str, str, str, int]:
    """(stage, size, sharding, processes) of ``stage2-mid:fsdp2x2``."""
    name, _, launch = row.partition(":")
    stage, size = name.split("-")
    sharding, _, n = (launch or "ddpx1").partition("x")
    return stage, size, sharding, int(n)

# The mid size: the paper's architectures with every width and depth cut, same kinds of blocks.
MID_FLORENCE = {
    "model_type": "florence2", "image_token_id": 51289, "is_encoder_decoder": True,
    "text_config": {"model_type": "bart", "vocab_size": 51328, "d_model": 512, "encoder_layers": 4, "decoder_layers": 4,
                    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048,
                    "decoder_ffn_dim": 2048, "max_position_embeddings": 1024, "activation_function": "gelu",
                    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "scale_embedding": False,
                    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
                    "forced_bos_token_id": 0, "forced_eos_token_id": 2},
    "vision_config": {"model_type": "florence_vision", "embed_dim": [64, 128, 256, 512], "num_heads": [2, 4, 8, 16],
                      "num_groups": [2, 4, 8, 16], "depths": [1, 1, 3, 1], "patch_size": [7, 3, 3, 3],
                      "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1],
                      "patch_prenorm": [False, True, True, True], "window_size": 12, "projection_dim": 512,
                      "max_position_embeddings": 50, "max_temporal_embeddings": 100, "drop_path_rate": 0.1}}
MID_SD = {"unet": {"block_out_channels": [128, 256, 512, 512], "attention_head_dim": [2, 4, 8, 8],
                   "cross_attention_dim": 512, "sample_size": 32},
          "vae": {"block_out_channels": [64, 128, 256, 256]},
          "text_encoder": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                           "num_hidden_layers": 6}}
MID_QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 32000, "hidden_size": 512,
            "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
            "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "use_cache": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
SIZES = {"shapes": {"florence": "florence2-shapes", "image_size": 64},
         "mid": {"florence": MID_FLORENCE, "image_size": 384, "decoder_size": 256}}


# ------------------------------------------------------------------------------------------------ models
def decoder_configs(size: str) -> dict[str, dict]:
    from vlv.training.plan import decoder_configs as configs

    if size == "shapes":
        return configs("shapes-teacher")
    base = configs("sd21-base")
    return {part: {**base[part], **MID_SD.get(part, {})} for part in base}


def recipe_sections(row: str):
    """The paper recipe of the row's stage, as its file says now, at the row's batch and launch."""
    from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
    from vlv.training.recipes import load_recipe, section

    stage, size, sharding, _ = parse_row(row)
    recipe = load_recipe("paper", stage)
    train = section(recipe, "train", TrainConfig, {**OVERRIDES["train"], "batch_size": BATCH[row.partition(":")[0]],
                                                   "sharding": sharding, "grad_accum": 1})
    if stage == "stage1":
        size_px = SIZES[size].get("decoder_size", SIZES[size]["image_size"])
        settings = section(recipe, "settings", Stage1Settings, {"image_size": size_px, **OVERRIDES[stage]},
                           decoder="", data="")
    else:
        settings = section(recipe, "settings", Stage2Settings, OVERRIDES[stage], decoder="", encoder="", lm="",
                           data="")
    return recipe, settings, train


def build(stage: str, size: str, settings) -> dict:
    """The row's modules, on the current default device (meta for the plan, the CPU for the measurement)."""
    from vlv.captioner import Captioner
    from vlv.config import DEFAULT_TRAINABLE, CaptionerConfig, EncoderConfig
    from vlv.decoder import DiffusionDecoder
    from vlv.diffusion import pipeline_from_configs
    from vlv.encoder import VLVEncoder
    from vlv.lm import build_lm
    from vlv.shapes.tokenizers import build_shapes_tokenizer

    decoder = DiffusionDecoder(pipeline_from_configs(decoder_configs(size)))
    trainable = list(DEFAULT_TRAINABLE) if settings.trainable in ("official", "mlp+llm+encoder") else "all"
    config = EncoderConfig(text_dim=decoder.text_dim, florence2=SIZES[size]["florence"],
                           image_size=SIZES[size]["image_size"], trainable=trainable, prompt_ids=[0, 2])
    encoder = VLVEncoder(config)
    if stage == "stage1":
        return {"encoder": encoder, "decoder": decoder}
    lm = build_lm("qwen2-shapes" if size == "shapes" else MID_QWEN)
    cap = CaptionerConfig(text_dim=decoder.text_dim, lm=lm.config.to_dict(), trainable=settings.trainable,
                          max_new_tokens=settings.max_new_tokens)
    return {"captioner": Captioner(cap, decoder.text_encoder, encoder, lm=lm, tokenizer=build_shapes_tokenizer())}


# ------------------------------------------------------------------------------------------------ estimate
def estimate(row: str) -> dict:
    from vlv.training.plan import plan_stage1_models, plan_stage2_models

    stage, size, _, processes = parse_row(row)
    recipe, settings, train = recipe_sections(row)
    with torch.device("meta"):
        models = build(stage, size, settings)
    if stage == "stage1":
        plan = plan_stage1_models(models["encoder"], models["decoder"], settings, train, processes,
                                  recipe=recipe["name"], target="cpu")
    else:
        plan = plan_stage2_models(models["captioner"], settings, train, processes, recipe=recipe["name"],
                                  target="cpu")
    return plan.to_dict()


# ------------------------------------------------------------------------------------------------ measure
def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _release() -> None:
    """Freed memory back to the system, so the resident set is what lives."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(row: str) -> dict:
    """In a fresh process (one rank of a launch): build the row's modules for real, wrap or shard them as the loop
    does, two optimizer steps; the second one's peak (the largest of the ranks')."""
    import torch.distributed as dist

    from vlv.training.draws import step_draws
    from vlv.training.sharding import mesh_for, precision_policy, shard
    from vlv.training.stage1 import stage1_loss
    from vlv.training.stage2 import stage2_loss

    stage, size, sharding, processes = parse_row(row)
    _, settings, cfg = recipe_sections(row)
    if processes > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if processes > 1 else 0
    b = cfg.batch_size
    torch.manual_seed(0)
    _release()
    before = _status("VmRSS")
    models = build(stage, size, settings)
    if stage == "stage1":
        encoder, decoder = models["encoder"], models["decoder"]
        if settings.gradient_checkpointing:
            decoder.unet.enable_gradient_checkpointing()
        trained, side = encoder, settings.image_size
        down = 2 ** (len(decoder.vae.config.block_out_channels) - 1)
        latent = (b, decoder.vae.config.latent_channels, side // down, side // down)
        latents, vision = settings.cache_latents, settings.cache_vision
        with torch.no_grad():
            features = encoder.image_features(torch.zeros(1, 3, encoder.config.image_size,
                                                          encoder.config.image_size)).shape[1:]

        def batch() -> dict[str, torch.Tensor]:  # what Stage1Task.batch gives
            out = {} if latents and vision else {"images": torch.rand(b, 3, side, side) * 2 - 1}
            if not vision:
                s = encoder.config.image_size  # the encoder's pixel_values, as its transform makes them
                out["pixel_values"] = torch.randn(b, 3, s, s)
            if latents:
                out.update(mean=torch.randn(latent), std=torch.rand(latent) + 0.1)
            if vision:
                out["vision"] = torch.randn(b, *features)
            return out

        def loss(x: dict, draws) -> torch.Tensor:
            return stage1_loss(decoder, model, x, draws, settings.high_noise_fraction).mean
    else:
        trained = captioner = models["captioner"]
        if settings.gradient_checkpointing:
            captioner.lm.activation_checkpointing_enable()
        side, length = captioner.encoder.config.image_size, settings.max_new_tokens

        def batch() -> dict[str, torch.Tensor]:
            ids = torch.randint(3, len(captioner.tokenizer), (b, length))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(b, 3, side, side)}

        def loss(x: dict, draws) -> torch.Tensor:
            return stage2_loss(model, x).mean
    trained.train()
    model = trained
    if sharding == "ddp" and processes > 1:  # as accelerate wraps it (gradient_as_bucket_view off)
        model = torch.nn.parallel.DistributedDataParallel(trained)
    elif sharding != "ddp":
        shard(trained, mesh_for(torch.device("cpu")), precision_policy(cfg.mixed_precision),
              reshard_after_forward=sharding == "fsdp2", methods=("generate_ids",) if stage == "stage2" else ())
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    times = []
    for i in range(2):
        if i:
            _release()
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the resident set
        t = time.perf_counter()
        x = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            value = loss(x, step_draws(cfg.seed, i, rank, processes, torch.device("cpu")))
        value.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del x, value
        times.append(time.perf_counter() - t)
    result = {"measured_bytes": _status("VmHWM") - before, "s_per_step": times[-1]}
    if processes > 1:
        every = [None] * processes
        dist.all_gather_object(every, result)
        dist.destroy_process_group()
        result = max(every, key=lambda r: r["measured_bytes"])
    return result if rank == 0 else {}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS),
                   help="STAGE-SIZE[:SHARDINGxN] (stage1|stage2, shapes|mid; e.g. stage2-mid:fsdp2x2 runs "
                        "torchrun with 2 processes); default: the four single-process rows")
    p.add_argument("--stage1-settings", type=json.loads, default={}, help="JSON overrides of stage1/paper's "
                   "settings, e.g. '{\"gradient_checkpointing\": true}'")
    p.add_argument("--stage2-settings", type=json.loads, default={}, help="JSON overrides of stage2/paper's settings")
    p.add_argument("--train", type=json.loads, default={}, help="JSON overrides of both recipes' train sections, e.g. "
                   "'{\"mixed_precision\": \"no\"}' (FSDP2's bf16 parameters fail CPU layer norms)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    OVERRIDES.update(stage1=args.stage1_settings, stage2=args.stage2_settings, train=args.train)
    if args.child:
        result = measure(args.child)
        if result:
            print(json.dumps(result))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    torch.set_num_threads(1)
    rows, t0 = [], time.perf_counter()
    print(f"{'row':>20} {'batch':>5} {'precision':>9} {'ckpt':>4} {'estimate GiB':>12} {'measured GiB':>12} "
          f"{'ratio':>6} {'plan s':>6} {'step s':>6}", flush=True)
    for row in args.rows:
        _, _, _, processes = parse_row(row)
        launch = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        overrides = ["--stage1-settings", json.dumps(args.stage1_settings), "--stage2-settings",
                     json.dumps(args.stage2_settings), "--train", json.dumps(args.train)]
        child = subprocess.run([*launch, __file__, "--child", row, *overrides], capture_output=True, text=True,
                               env=env)
        if child.returncode:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        t = time.perf_counter()
        plan = estimate(row)
        plan_s = time.perf_counter() - t
        est, got = plan["peak_bytes"], measured["measured_bytes"]
        rows.append({"row": row, "settings": OVERRIDES[parse_row(row)[0]], "train": OVERRIDES["train"],
                     "estimate_bytes": est, **measured, "ratio": est / got, "plan_s": plan_s,
                     "memory": plan["memory"], "batch_size": plan["batch_size"], "precision": plan["precision"],
                     "gradient_checkpointing": plan["gradient_checkpointing"]})
        print(f"{row:>20} {plan['batch_size']:5d} {plan['precision']:>9} "
              f"{'on' if plan['gradient_checkpointing'] else 'off':>4} {est / GIB:12.3f} {got / GIB:12.3f} "
              f"{est / got:6.2f} {plan_s:6.1f} {measured['s_per_step']:6.1f}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s; ratio = estimate / measured")
    write_result(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
