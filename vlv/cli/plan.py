"""``vlv plan``: what a recipe's run costs per process (memory of a step, FLOPs, checkpoint and cache sizes), before
anything loads; the library (``vlv.training.plan``) makes the plan, this only parses."""

from __future__ import annotations

import argparse
import json

from vlv.cli.flags import positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="a recipe's cost per process before a run: peak memory of one step, FLOPs, "
                                    "checkpoint and cache sizes, global batch (architectures only, no weights)")
    p.add_argument("--recipe", required=True, help="stage1/paper, stage2/paper, ... (a name both stages have needs "
                   "its stage) or a recipe JSON file")
    p.add_argument("--processes", type=positive_int, default=1, help="processes (GPUs) of the launch (default 1)")
    p.add_argument("--gpu-memory", type=positive_float, default=None, metavar="GIB",
                   help="GiB per GPU: say whether a step fits, and exit 2 with one line when it does not "
                        "(default: none, no verdict)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="dataset size, for the caches' total size (default: none, sizes per sample only)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    g = p.add_argument_group("sources (architectures only; default: the paper's)")
    g.add_argument("--decoder", default=None, help="Stable Diffusion dir, shipped name or config stem "
                   "(default sd21-base)")
    g.add_argument("--encoder", default=None, help="stage 1: named encoder or Florence-2 dir (default: the "
                   "recipe's); stage 2: stage-1 run dir, or a named encoder as stage1/paper trains it (default "
                   "florence2-large)")
    g.add_argument("--lm", default=None, help="stage 2: LM dir or config stem (default qwen2.5-3b)")
    g = p.add_argument_group("the recipe's fields to change (default for each: the recipe's value)")
    recipe = " (default: the recipe's)"
    g.add_argument("--batch-size", type=positive_int, default=None, help="per process" + recipe)
    g.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per step" + recipe)
    g.add_argument("--sharding", choices=["ddp", "fsdp2", "zero2"], default=None, help="how state is split" + recipe)
    g.add_argument("--precision", dest="mixed_precision", choices=["no", "bf16"], default=None,
                   help="autocast" + recipe)
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward" + recipe)
    g.add_argument("--image-size", type=positive_int, default=None, help="stage 1: the data resolution" + recipe)
    g.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 1: VAE posteriors cached" + recipe)
    g.add_argument("--cache-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 1: DaViT features cached" + recipe)
    g.add_argument("--cache-text-embeds", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2: T(E(x)) cached" + recipe)
    g.add_argument("--trainable", default=None, help="stage 1: config|official|all; stage 2: mlp|mlp+llm|"
                   "mlp+llm+encoder" + recipe)
    g.add_argument("--lora-rank", type=int, default=None, help="stage 2: LoRA on the LLM, 0 = full" + recipe)
    g.add_argument("--caption-tokens", type=positive_int, default=None,
                   help="stage 2: caption + EOS tokens per sample (default: the longest a step takes, max_new_tokens)")
    p.set_defaults(func=cmd_plan)


STAGE_ONLY = {"image_size": "stage1", "cache_latents": "stage1", "cache_vision": "stage1", "lm": "stage2",
              "cache_text_embeds": "stage2", "lora_rank": "stage2", "caption_tokens": "stage2"}
SETTINGS = ("decoder", "encoder", "lm", "gradient_checkpointing", "image_size", "cache_latents", "cache_vision",
            "cache_text_embeds", "trainable", "lora_rank")
TRAIN = ("batch_size", "grad_accum", "sharding", "mixed_precision")


def cmd_plan(args: argparse.Namespace) -> None:
    from vlv.errors import InvalidInput
    from vlv.training.plan import check_fits, plan_recipe, recipe_task

    task = recipe_task(args.recipe)
    for name, stage in STAGE_ONLY.items():
        if getattr(args, name) is not None and stage != task:
            raise InvalidInput(f"--{name.replace('_', '-')} is a {stage} setting; {args.recipe} is a {task} recipe")
    tokenizer = None
    if task == "stage2":
        from vlv.shapes.tokenizers import tokenizer_for
        from vlv.training.plan import DEFAULT_LM

        tokenizer = tokenizer_for(args.lm or DEFAULT_LM)
    plan = plan_recipe(args.recipe, args.processes, args.samples,
                       settings={k: getattr(args, k) for k in SETTINGS},
                       train={k: getattr(args, k) for k in TRAIN if getattr(args, k) is not None},
                       tokenizer=tokenizer, caption_tokens=args.caption_tokens)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print("\n".join(plan.lines(args.gpu_memory)))
    if args.gpu_memory is not None:
        check_fits(plan, args.gpu_memory)
