"""The jobs behind the subcommands: each checks what it can before the heavy imports, then calls the library."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vlv.cli.flags import command_line, given


# ------------------------------------------------------------------------------------------- data
def cmd_data_shapes(args: argparse.Namespace) -> None:
    from vlv.shapes.data import write_shapes

    t0 = time.perf_counter()
    write_shapes(args.out, n=args.n, seed=args.seed, split=args.split, progress=not args.quiet)
    print(f"wrote {args.n} {args.split} scenes to {args.out} in {time.perf_counter() - t0:.1f}s")


def cmd_data_sheet(args: argparse.Namespace) -> None:
    from vlv.shapes.report import save_contact_sheet

    save_contact_sheet(args.data, args.out, n=args.n, cols=args.cols)
    print(f"wrote {args.out}")


def cmd_data_shards(args: argparse.Namespace) -> None:
    from vlv.datasets import open_dataset, write_shards

    t0 = time.perf_counter()
    src = open_dataset(args.src, image_column=args.image_column, caption_column=args.caption_column)
    shards = write_shards(src, args.out, args.shard_size, progress=not args.quiet)
    print(f"wrote {len(src)} samples in {len(shards)} shard(s) to {args.out} in {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------------------------------- teacher
def cmd_teacher_train(args: argparse.Namespace) -> None:
    from vlv.shapes.config import TINY, TeacherConfig, TeacherRecipe
    from vlv.shapes.teacher import train_teacher
    from vlv.training.recipes import load_recipe, section

    _require_dirs(args.data, args.val)
    recipe = section(load_recipe(args.recipe, "teacher"), "settings", TeacherRecipe, given(args, TeacherRecipe))
    done = train_teacher(args.data, args.out, TINY if args.tiny else TeacherConfig(), recipe, val=args.val,
                         max_minutes=args.minutes, command=command_line())
    print(f"teacher saved to {done}" if done else f"time budget reached; run the same command to resume ({args.out})")


def cmd_teacher_export(args: argparse.Namespace) -> None:
    import torch

    from vlv.shapes.teacher import export_checkpoint

    export_checkpoint(args.teacher, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"exported to {args.out}")


def cmd_teacher_sample(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    path = resolve_decoder(args.teacher)  # validate the inputs before the heavy imports
    prompts = [args.prompt] if args.prompt else [
        line.strip() for line in Path(args.captions).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no captions in {args.captions}")
    from vlv.diffusion import load_pipeline, sample

    images = sample(load_pipeline(path), prompts, guidance_scale=args.cfg, steps=args.steps, sampler=args.sampler,
                    seed=args.seed)
    if len(images) == 1 and args.out.suffix:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(args.out / f"{i:06d}.png")
    print(f"wrote {len(images)} image(s) to {args.out}")


# ---------------------------------------------------------------------------------------- stage 1
def _recipe_settings(args: argparse.Namespace, task: str, settings_type: type, train_overrides: dict | None = None):
    """(recipe, settings, train config) of a training command: the recipe's sections, each flag given on top."""
    from vlv.training.loop import TrainConfig
    from vlv.training.recipes import load_recipe, section

    recipe = load_recipe(args.recipe, task)
    settings = section(recipe, "settings", settings_type, given(args, settings_type))
    cfg = section(recipe, "train", TrainConfig, {**given(args, TrainConfig), **(train_overrides or {})})
    return recipe, settings, cfg


def _saved(done: bool, what: str, out: str) -> None:
    if int(os.environ.get("RANK", 0)):  # one line per run, not per process
        return
    print(f"{what} saved to {out}" if done else f"stopped early; run the same command to resume ({out})")


def cmd_train_stage1(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)  # fail fast, before the heavy imports
    if args.init:
        resolve_encoder(args.init)
    _require_data(args.data)
    _require_dirs(args.val)
    for cache in (args.latents_cache, args.vision_cache):
        _require_dirs(cache)
    if args.init and args.phi_init_gain is not None:
        raise ValueError(f"--phi-init-gain scales phi's freshly initialised weights, but --init {args.init}"
                         " overwrites them with trained ones; pass one or the other")
    from vlv.training.recipes import resolved
    from vlv.training.stage1 import Stage1Settings, check_settings, train_stage1

    # A budgeted run plans its own step count after a few steps.
    recipe, settings, cfg = _recipe_settings(args, "stage1", Stage1Settings,
                                             {"steps": 10**9} if args.budget_minutes else None)
    check_settings(settings)
    evaluator = None
    if args.val:
        from vlv.shapes.metrics import stage1_evaluator

        evaluator = stage1_evaluator(args.val, args.eval_n)
    done = train_stage1(settings, cfg, args.out, evaluator=evaluator,
                        recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "encoder", args.out)


def _precompute_encoder(args: argparse.Namespace, text_dim: int):
    """A stage-1 run dir loads as it is; a named encoder or Florence-2 dir is built as a stage-1 run builds it."""
    from vlv.encoder import CONFIG_FILE, VLVEncoder

    if (Path(args.encoder) / CONFIG_FILE).is_file():
        return VLVEncoder.from_pretrained(args.encoder)
    from vlv.training.stage1 import Stage1Settings, build_encoder

    settings = Stage1Settings(decoder=args.decoder, data=str(args.data), encoder=args.encoder,
                              trainable=args.trainable)
    return build_encoder(settings, text_dim, args.seed)


def cmd_precompute(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    resolve_decoder(args.decoder)  # fail fast, before the heavy imports
    _require_data(args.data)
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    import contextlib

    import torch

    from vlv.caches import latents_key, latents_rows, rank_and_world, vision_key, vision_rows, write_cache
    from vlv.datasets import open_dataset
    from vlv.decoder import DiffusionDecoder

    rank, world = rank_and_world()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    dataset = open_dataset(args.data, image_column=args.image_column, caption_column=args.caption_column)
    decoder = DiffusionDecoder.from_pretrained(args.decoder)
    size = args.image_size or decoder.image_size
    autocast = contextlib.nullcontext()
    if args.what == "latents":
        vae = decoder.vae.to(device)
        key, rows = latents_key(vae, dataset, size), latents_rows(vae)
    else:
        encoder = _precompute_encoder(args, decoder.text_dim).to(device)
        del decoder
        key, rows = vision_key(encoder, dataset, size), vision_rows(encoder)
        if args.precision == "bf16":
            autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    with autocast:
        bad = write_cache(args.out, key, dataset, rows, args.batch_size, args.shard_rows, rank, world,
                          args.num_workers, args.on_bad_image, progress=not args.quiet)
    print(f"rank {rank}/{world}: {args.what} cache of {len(dataset)} samples at {size} px in {args.out} "
          f"({bad} bad image(s) left empty) in {time.perf_counter() - t0:.1f}s")


def _load_encoder_decoder(args: argparse.Namespace):
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder), resolve_encoder(args.encoder)  # fail fast, before the heavy imports
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder

    return VLVEncoder.from_pretrained(args.encoder).eval(), DiffusionDecoder.from_pretrained(args.decoder)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    import numpy as np
    from tqdm.auto import tqdm

    from vlv.data import list_images, load_image, to_pil, to_tensor
    from vlv.inference import reconstruct_images

    paths = list_images(args.images)
    encoder, decoder = _load_encoder_decoder(args)
    size = encoder.config.image_size  # the encoder's input, resized once by PIL as Florence-2's processor does
    args.out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reconstruct", unit="batch"):
        chunk = paths[start : start + args.batch_size]
        x = to_tensor(np.stack([load_image(p, size) for p in chunk]))
        recon = reconstruct_images(encoder, decoder, x, sampler=args.sampler, guidance_scale=args.cfg,
                                   steps=args.steps, batch_size=args.batch_size, seed=args.seed + start)
        for p, im in zip(chunk, to_pil(recon), strict=True):
            im.save(args.out / (p.stem + ".png"))
    print(f"wrote {len(paths)} reconstruction(s) to {args.out}")


def cmd_embed(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from vlv.data import list_images, load_image, to_tensor
    from vlv.modeling import atomic_save_file
    from vlv.shipped import resolve_decoder, resolve_encoder

    paths = list_images(args.images)
    resolve_encoder(args.encoder)  # fail fast, before the heavy imports
    if args.decoder:
        resolve_decoder(args.decoder)
    from vlv.encoder import VLVEncoder
    from vlv.inference import embed_images
    from vlv.text_encoder import clip_from_embeds, load_text_encoder

    encoder = VLVEncoder.from_pretrained(args.encoder).eval()
    text_encoder = load_text_encoder(resolve_decoder(args.decoder)) if args.decoder else None
    size, parts = encoder.config.image_size, {"z": [], "T_z": []}
    for start in tqdm(range(0, len(paths), args.batch_size), desc="embed", unit="batch"):
        x = to_tensor(np.stack([load_image(p, size) for p in paths[start : start + args.batch_size]]))
        z = embed_images(encoder, x, batch_size=args.batch_size)  # (B, Nq, d_T)
        parts["z"].append(z)
        if text_encoder is not None:
            with torch.no_grad():
                parts["T_z"].append(clip_from_embeds(text_encoder, z))  # (B, Nq, d_T)
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(tensors, args.out, metadata={"images": json.dumps([str(p) for p in paths]),
                                                  "encoder": str(args.encoder)})
    print(f"wrote {', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())} of {len(paths)} image(s) "
          f"to {args.out}")


def cmd_compose(args: argparse.Namespace) -> None:
    import numpy as np

    from vlv.data import load_image, to_pil, to_tensor
    from vlv.inference import compose_images

    for p in (args.a, args.b):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such image: {p}")
    encoder, decoder = _load_encoder_decoder(args)
    size = encoder.config.image_size
    k = args.k or encoder.config.num_queries // 2
    a, b = (to_tensor(np.stack([load_image(p, size)])) for p in (args.a, args.b))
    image = compose_images(encoder, decoder, a, b, k, sampler=args.sampler, guidance_scale=args.cfg,
                           steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image)[0].save(args.out)
    print(f"wrote {args.out} (first {k} embeddings of each image)")


# ---------------------------------------------------------------------------------------- stage 2
def _require_dirs(*folders) -> None:
    for folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")


def _require_data(data) -> None:
    """A dataset is a folder, a .tar / .parquet file or a brace pattern of them (checked when opened)."""
    if data is not None and "{" not in str(data) and not Path(data).exists():
        raise FileNotFoundError(f"no such dataset: {data}")


def _tokenizer_for(lm: str):
    """A random-init LM config has no tokenizer: the command line's LMs are the shapes world's."""
    from vlv.lm import is_lm_dir

    if is_lm_dir(lm):
        return None
    from vlv.shapes.tokenizers import build_shapes_tokenizer

    return build_shapes_tokenizer()


def cmd_train_lm(args: argparse.Namespace) -> None:
    _require_dirs(args.data, args.val)
    from vlv.training.lm import LMSettings, train_lm
    from vlv.training.recipes import resolved

    recipe, settings, cfg = _recipe_settings(args, "lm", LMSettings)
    judge = None
    if settings.val:
        from vlv.shapes.metrics import lm_judge as judge
    done = train_lm(settings, cfg, args.out, tokenizer=_tokenizer_for(settings.lm), judge=judge,
                    recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "language model", args.out)


def cmd_train_florence2(args: argparse.Namespace) -> None:
    _require_dirs(args.data, args.val)
    from vlv.shapes.config import DetectionSettings
    from vlv.shapes.florence2 import train_florence2
    from vlv.training.recipes import resolved

    recipe, settings, cfg = _recipe_settings(args, "florence2", DetectionSettings)
    done = train_florence2(settings, cfg, args.out, recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "Florence-2", args.out)


def cmd_train_stage2(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)
    _require_data(args.data)
    _require_dirs(args.val)
    resolve_encoder(args.encoder)
    from vlv.training.recipes import resolved
    from vlv.training.stage2 import Stage2Settings, train_stage2

    recipe, settings, cfg = _recipe_settings(args, "stage2", Stage2Settings)
    evaluator = None
    if args.val:
        from vlv.shapes.metrics import stage2_evaluator

        evaluator = stage2_evaluator(args.val, args.eval_n)
    done = train_stage2(settings, cfg, args.out, evaluator=evaluator, tokenizer=_tokenizer_for(settings.lm),
                        recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "captioner", args.out)


def cmd_caption(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    from tqdm.auto import tqdm

    from vlv.data import list_images, load_image, to_tensor
    from vlv.modeling import atomic_write_text
    from vlv.shipped import resolve_stage2

    paths = list_images(args.images)
    resolve_stage2(args.model)  # fail fast, before the heavy imports
    from vlv.captioner import Captioner
    from vlv.inference import caption_images

    captioner = Captioner.from_pretrained(args.model).eval()
    size = captioner.encoder.config.image_size
    if args.max_new_tokens:
        captioner.config.max_new_tokens = args.max_new_tokens
    if args.postprocess:
        captioner.config.postprocess = None if args.postprocess == "none" else args.postprocess
    rows = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="caption", unit="batch"):
        chunk = paths[start : start + args.batch_size]
        x = to_tensor(np.stack([load_image(p, size) for p in chunk]))
        caps = caption_images(captioner, x, batch_size=args.batch_size, num_beams=args.num_beams)
        rows += [{"image": p.name, "caption": c} for p, c in zip(chunk, caps, strict=True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} caption(s) to {args.out}")


# ----------------------------------------------------------------------------------- official imports
def _print_counts(counts: dict[str, int], written: str) -> None:
    """What an import mapped, per group, then what it wrote."""
    print(f"tensors mapped per group ({sum(counts.values())} in all):")
    width = max(map(len, counts), default=0)
    for group, n in counts.items():
        print(f"  {group:<{width}}  {n}")
    print(written)


def cmd_import_florence2(args: argparse.Namespace) -> None:
    _require_dirs(args.src)
    from vlv.official.florence2 import convert_florence2

    counts = convert_florence2(args.src, args.out)
    _print_counts(counts, f"native Florence-2 written to {args.out}")


def cmd_import_stage1(args: argparse.Namespace) -> None:
    if not args.ckpt.exists():
        raise FileNotFoundError(f"no such checkpoint: {args.ckpt}")
    _require_dirs(args.florence2, args.decoder)
    from vlv.official.stage1 import import_stage1

    counts = import_stage1(args.ckpt, args.florence2, args.decoder, args.out)
    _print_counts(counts, f"stage-1 encoder written to {args.out}")


def cmd_import_stage2(args: argparse.Namespace) -> None:
    if not args.model_pt.exists():
        raise FileNotFoundError(f"no such checkpoint: {args.model_pt}")
    _require_dirs(args.florence2, args.decoder, args.lm)
    from vlv.official.stage2 import import_stage2

    counts = import_stage2(args.model_pt, args.florence2, args.decoder, args.lm, args.out)
    _print_counts(counts, f"stage-2 captioner written to {args.out} "
                          f"(caption with: vlv caption IMAGES --model {args.out} --out X)")


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    run_demo(args.out, recipe=args.recipe, minutes=args.minutes)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if not (args.run / "teacher" / "model_index.json").is_file():
        raise FileNotFoundError(f"{args.run} is not a VLV run dir (no teacher/model_index.json)")
    from vlv.shapes.evaluate import EvalSettings, evaluate_run
    from vlv.shapes.report import build_report

    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    evaluate_run(args.run, settings)
    print(f"wrote {args.run / 'metrics.json'} and {build_report(args.run)}")
