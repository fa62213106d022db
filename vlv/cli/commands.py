"""The jobs behind the subcommands: each checks all its inputs before the heavy imports and before it creates
anything, then calls the library. A check that fails raises :class:`vlv.errors.UserError` (one line, exit 2)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from vlv.checks import check_checkpoints, check_name_or_path, text_length
from vlv.cli.flags import command_line, given
from vlv.errors import InvalidInput, UserError


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """Arguments parsed into settings: a ValueError or TypeError raised here is about what the user gave (a flag,
    a recipe file), since nothing but the input has been read yet."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise InvalidInput(str(e)) from None


def _images(paths: list[Path], skip_bad: bool) -> list[Path]:
    """The image files of the arguments, each decoded once now, so a bad one stops the command before any model
    loads (or, with --skip-bad, is left out and counted)."""
    from vlv.data.images import list_images, open_image
    from vlv.errors import BadImage

    found, bad = list_images(paths), []
    for p in found:
        try:
            open_image(p, check_only=True)
        except BadImage as e:
            if not skip_bad:
                raise BadImage(f"{e} (--skip-bad skips unreadable images)") from None
            bad.append(p)
    good = [p for p in found if p not in set(bad)]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) of {len(found)} (first {bad[0]})")
    if not good:
        raise InvalidInput(f"none of the {len(found)} image(s) is readable")
    return good


def _save_image(image, path: Path) -> None:
    """PNG to a temp name, then renamed: a failure never leaves a torn file under the final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _require_folder(folder, captions: bool = False, images: int = 0) -> None:
    """An image(-caption) folder whose captions.jsonl reads (with captions where the stage needs them) and whose
    first ``images`` images decode."""
    if folder is None:
        return
    from vlv.data.images import open_image
    from vlv.data.records import read_records, require_captions

    records = read_records(Path(folder))
    if captions:
        require_captions(records, folder)
    for r in records[:images]:
        open_image(Path(folder) / r.image)


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
    from vlv.data.datasets import open_dataset
    from vlv.data.shards import write_shards

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
    _require_folder(args.data, captions=True)  # the text-to-image teacher learns from captions
    _require_folder(args.val, captions=True)
    with checking():
        recipe = section(load_recipe(args.recipe, "teacher"), "settings", TeacherRecipe, given(args, TeacherRecipe))
    check_checkpoints(args.out)
    done = train_teacher(args.data, args.out, TINY if args.tiny else TeacherConfig(), recipe, val=args.val,
                         max_minutes=args.minutes, command=command_line(), on_bad_image=args.on_bad_image,
                         resume_override=args.resume == "override")
    print(f"teacher saved to {done}" if done else f"time budget reached; run the same command to resume ({args.out})")


def cmd_teacher_export(args: argparse.Namespace) -> None:
    import torch

    from vlv.checks import safetensors_keys
    from vlv.shapes.teacher import export_checkpoint

    check_checkpoints(args.teacher)
    if (args.teacher / "training" / "latents.safetensors").is_file():
        safetensors_keys(args.teacher / "training" / "latents.safetensors")
    export_checkpoint(args.teacher, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"exported to {args.out}")


def cmd_teacher_sample(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    path = resolve_decoder(args.teacher)  # validate the inputs before the heavy imports
    if args.prompt is not None:  # "" is a valid caption: the unconditional one CFG guides against
        prompts = [args.prompt]
    else:
        try:
            text = Path(args.captions).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"--captions {args.captions}: not a UTF-8 text file") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InvalidInput(f"--captions {args.captions}: no captions in it")
    single = len(prompts) == 1 and bool(args.out.suffix) and not args.out.is_dir()
    if not single and args.out.is_file():
        raise InvalidInput(f"--out {args.out}: a file, but {len(prompts)} captions need a folder")
    from vlv.diffusion import load_pipeline, sample

    images = sample(load_pipeline(path), prompts, guidance_scale=args.cfg, steps=args.steps, sampler=args.sampler,
                    seed=args.seed)
    if single:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _save_image(images[0], args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            _save_image(im, args.out / f"{i:06d}.png")
    print(f"wrote {len(images)} image(s) to {args.out}")


# ---------------------------------------------------------------------------------------- stage 1
def _recipe_settings(args: argparse.Namespace, task: str, settings_type: type, train_overrides: dict | None = None):
    """(recipe, settings, train config) of a training command: the recipe's sections, each flag given on top."""
    from vlv.training.loop import TrainConfig
    from vlv.training.recipes import load_recipe, section

    with checking():
        recipe = load_recipe(args.recipe, task)
        settings = section(recipe, "settings", settings_type, given(args, settings_type))
        cfg = section(recipe, "train", TrainConfig, {**given(args, TrainConfig), **(train_overrides or {})})
    check_checkpoints(args.out)
    return recipe, settings, cfg


def _saved(done: bool, what: str, out: str) -> None:
    if int(os.environ.get("RANK", 0)):  # one line per run, not per process
        return
    print(f"{what} saved to {out}" if done else f"stopped early; run the same command to resume ({out})")


def cmd_train_stage1(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder, resolve_encoder

    decoder = resolve_decoder(args.decoder)  # fail fast, before the heavy imports
    if args.init:
        resolve_encoder(args.init)
    _require_data(args.data)
    _require_dirs(args.val)
    _require_folder(args.val, captions=True, images=args.eval_n)
    for cache in (args.latents_cache, args.vision_cache):
        if cache is not None:
            from vlv.data.caches import Cache

            _require_dirs(cache)
            Cache(cache)  # made and finished: what it was made from is checked once the models load
    if args.init and args.phi_init_gain is not None:
        raise InvalidInput(f"--phi-init-gain scales phi's freshly initialised weights, but --init {args.init}"
                           " overwrites them with trained ones; pass one or the other")
    from vlv.training.recipes import resolved
    from vlv.training.stage1 import Stage1Settings, check_settings, encoder_config, train_stage1

    # A budgeted run plans its own step count after a few steps.
    recipe, settings, cfg = _recipe_settings(args, "stage1", Stage1Settings,
                                             {"steps": 10**9} if args.budget_minutes else None)
    _check_stage1(settings, decoder)
    with checking():
        check_settings(settings)
        encoder_config(settings, text_dim=1)  # an unknown encoder name fails here
    _open_data(settings.data, settings.image_column, settings.caption_column)
    evaluator = None
    if args.val:
        from vlv.shapes.metrics import stage1_evaluator

        evaluator = stage1_evaluator(args.val, args.eval_n)
    done = train_stage1(settings, cfg, args.out, evaluator=evaluator,
                        recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "encoder", args.out)


def _check_stage1(settings, decoder: Path) -> None:
    """What a stage-1 run's settings ask of its inputs: the encoder is named unambiguously, and Nq fits."""
    import json

    from vlv.config import list_encoders

    check_name_or_path(settings.encoder, list_encoders(), "named encoder", "--encoder")
    limit = text_length(decoder)
    if settings.num_queries > limit:
        raise InvalidInput(f"--nq {settings.num_queries}: the decoder's text encoder has only {limit} positions")
    if settings.init:
        from vlv.encoder import CONFIG_FILE
        from vlv.shipped import resolve_encoder

        source = json.loads((resolve_encoder(settings.init) / CONFIG_FILE).read_text())["config"]["num_queries"]
        if settings.num_queries > source:
            raise InvalidInput(f"--nq {settings.num_queries}: more queries than --init {settings.init} has "
                               f"({source}); a warm start keeps its first Nq")


def _open_data(data: str, image_column: str = "image", caption_column: str = "caption", captions: bool = False):
    """The dataset opened once now (a folder's rows are read and typed, shards indexed, parquet columns checked),
    so a bad one fails before any model loads."""
    from vlv.data.datasets import open_dataset

    dataset = open_dataset(data, image_column=image_column, caption_column=caption_column)
    if not len(dataset):
        raise InvalidInput(f"{data}: no samples")
    if captions and dataset.read(0).caption is None:
        raise InvalidInput(f"{data}: no captions (sample {dataset.where(0)} has none); this stage needs them")
    return dataset


def _precompute_encoder(args: argparse.Namespace, text_dim: int):
    """A stage-1 run dir loads as it is; a named encoder or Florence-2 dir is built as a stage-1 run builds it."""
    from vlv.encoder import CONFIG_FILE, VLVEncoder

    if (Path(args.encoder) / CONFIG_FILE).is_file():
        return VLVEncoder.from_pretrained(args.encoder)
    from vlv.training.stage1 import Stage1Settings, build_encoder

    settings = Stage1Settings(decoder=args.decoder, data=str(args.data), encoder=args.encoder,
                              trainable=args.trainable)
    return build_encoder(settings, text_dim, args.seed)


def _check_vision_encoder(args: argparse.Namespace) -> None:
    """The encoder of ``precompute vision``: a run dir, or a name / Florence-2 dir as stage 1 builds it."""
    from vlv.config import list_encoders
    from vlv.encoder import CONFIG_FILE
    from vlv.shipped import resolve_encoder

    if (Path(args.encoder) / CONFIG_FILE).is_file() or args.encoder == "shapes-stage1":
        resolve_encoder(args.encoder)
        return
    check_name_or_path(args.encoder, list_encoders(), "named encoder", "--encoder")
    from vlv.training.stage1 import Stage1Settings, encoder_config

    with checking():
        encoder_config(Stage1Settings(decoder=args.decoder, data=str(args.data), encoder=args.encoder,
                                      trainable=args.trainable), text_dim=1)


def cmd_precompute(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    resolve_decoder(args.decoder)  # fail fast, before the heavy imports
    _require_data(args.data)
    if args.num_workers < 0:
        raise InvalidInput(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.what == "vision":
        _check_vision_encoder(args)
    _open_data(args.data, args.image_column, args.caption_column)
    import torch

    from vlv.data.caches import latents_key, latents_rows, rank_and_world, vision_key, vision_rows, write_cache
    from vlv.data.datasets import open_dataset
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
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder

    return VLVEncoder.from_pretrained(args.encoder).eval(), DiffusionDecoder.from_pretrained(args.decoder)


def _encoder_config(encoder: str) -> dict:
    """A stage-1 run's encoder config, read from its JSON (no model built), its weights files checked."""
    import json

    from vlv.encoder import CONFIG_FILE
    from vlv.shipped import resolve_encoder

    return json.loads((resolve_encoder(encoder) / CONFIG_FILE).read_text())["config"]


def cmd_reconstruct(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    paths = _images(args.images, args.skip_bad)
    resolve_decoder(args.decoder), _encoder_config(args.encoder)  # fail fast, before the heavy imports
    import numpy as np
    from tqdm.auto import tqdm

    from vlv.data.images import load_image, to_pil, to_tensor
    from vlv.inference import reconstruct_images

    encoder, decoder = _load_encoder_decoder(args)
    size = encoder.config.image_size  # the encoder's input, resized once by PIL as Florence-2's processor does
    args.out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reconstruct", unit="batch"):
        chunk = paths[start : start + args.batch_size]
        x = to_tensor(np.stack([load_image(p, size) for p in chunk]))
        recon = reconstruct_images(encoder, decoder, x, sampler=args.sampler, guidance_scale=args.cfg,
                                   steps=args.steps, batch_size=args.batch_size, seed=args.seed + start)
        for p, im in zip(chunk, to_pil(recon), strict=True):
            _save_image(im, args.out / (p.stem + ".png"))
    print(f"wrote {len(paths)} reconstruction(s) to {args.out}")


def cmd_embed(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder

    paths = _images(args.images, args.skip_bad)
    _encoder_config(args.encoder)  # fail fast, before the heavy imports
    if args.decoder:
        resolve_decoder(args.decoder)
    import json

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from vlv.data.images import load_image, to_tensor
    from vlv.encoder import VLVEncoder
    from vlv.inference import embed_images
    from vlv.modeling import atomic_save_file
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
    from vlv.shipped import resolve_decoder

    for p in (args.a, args.b):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such image: {p}")
    if len(_images([args.a, args.b], args.skip_bad)) < 2:
        raise InvalidInput("compose needs both images, and one is unreadable")
    decoder = resolve_decoder(args.decoder)
    nq, positions = _encoder_config(args.encoder)["num_queries"], text_length(decoder)
    k = args.k or nq // 2
    if not 0 < k <= min(nq, positions // 2):
        raise InvalidInput(f"--k {k}: must be in 1..{min(nq, positions // 2)} (the encoder has {nq} embeddings, "
                           f"and the 2k of both images must fit the decoder's {positions} text positions)")
    import numpy as np

    from vlv.data.images import load_image, to_pil, to_tensor
    from vlv.inference import compose_images

    encoder, decoder = _load_encoder_decoder(args)
    size = encoder.config.image_size
    a, b = (to_tensor(np.stack([load_image(p, size)])) for p in (args.a, args.b))
    image = compose_images(encoder, decoder, a, b, k, sampler=args.sampler, guidance_scale=args.cfg,
                           steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _save_image(to_pil(image)[0], args.out)
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


def _check_lm(lm: str) -> None:
    """An LM source: a config stem (random init), or an LM dir whose weights read; never both."""
    from vlv.checks import check_weights_in
    from vlv.lm import is_lm_dir, list_lm_configs
    from vlv.shipped import resolve_lm_name

    check_name_or_path(lm, list_lm_configs(), "LM config", "--lm")
    if is_lm_dir(lm):
        path = Path(resolve_lm_name(lm))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--lm {lm}: no causal LM there (no config.json), nor an LM config of "
                                    f"{', '.join(list_lm_configs())}")
        check_weights_in(path)


def cmd_train_lm(args: argparse.Namespace) -> None:
    _require_dirs(args.data, args.val)
    _require_folder(args.data, captions=True)
    _require_folder(args.val, captions=True)
    from vlv.training.lm import LMSettings, train_lm
    from vlv.training.recipes import resolved

    recipe, settings, cfg = _recipe_settings(args, "lm", LMSettings)
    _check_lm(settings.lm)
    judge = None
    if settings.val:
        from vlv.shapes.metrics import lm_judge as judge
    done = train_lm(settings, cfg, args.out, tokenizer=_tokenizer_for(settings.lm), judge=judge,
                    recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "language model", args.out)


def cmd_train_florence2(args: argparse.Namespace) -> None:
    _require_dirs(args.data, args.val)
    from vlv.shapes.config import DetectionSettings
    from vlv.shapes.florence2 import read_scenes, train_florence2
    from vlv.training.recipes import resolved

    for folder in (args.data, args.val):
        if folder is not None:
            read_scenes(Path(folder))  # detection needs every row's scene
    recipe, settings, cfg = _recipe_settings(args, "florence2", DetectionSettings)
    done = train_florence2(settings, cfg, args.out, recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "Florence-2", args.out)


def cmd_train_stage2(args: argparse.Namespace) -> None:
    from vlv.shipped import resolve_decoder, resolve_encoder

    resolve_decoder(args.decoder)
    _require_data(args.data)
    _require_dirs(args.val)
    _require_folder(args.val, captions=True, images=args.eval_n)
    resolve_encoder(args.encoder)
    from vlv.training.recipes import resolved
    from vlv.training.stage2 import Stage2Settings, train_stage2

    recipe, settings, cfg = _recipe_settings(args, "stage2", Stage2Settings)
    _check_lm(settings.lm)
    _open_data(settings.data, settings.image_column, settings.caption_column, captions=True)
    evaluator = None
    if args.val:
        from vlv.shapes.metrics import stage2_evaluator

        evaluator = stage2_evaluator(args.val, args.eval_n)
    done = train_stage2(settings, cfg, args.out, evaluator=evaluator, tokenizer=_tokenizer_for(settings.lm),
                        recipe=resolved(recipe, train=cfg, settings=settings))
    _saved(done, "captioner", args.out)


def _check_captioner(model: str) -> None:
    """A stage-2 run and the parts its config names (T's decoder dir, the stage-1 encoder), read but not loaded."""
    import json

    from vlv.modeling import in_run_dir
    from vlv.shipped import resolve_decoder, resolve_encoder, resolve_stage2

    path = resolve_stage2(model)
    try:
        config = json.loads((path / "captioner.json").read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInput(f"{path / 'captioner.json'}: not a captioner config ({e})") from None
    if config.get("text_encoder"):
        resolve_decoder(in_run_dir(path, config["text_encoder"]))
    if config.get("encoder"):
        resolve_encoder(in_run_dir(path, config["encoder"]))


def cmd_caption(args: argparse.Namespace) -> None:
    paths = _images(args.images, args.skip_bad)
    _check_captioner(args.model)  # fail fast, before the heavy imports
    import json

    import numpy as np
    from tqdm.auto import tqdm

    from vlv.captioner import Captioner
    from vlv.data.images import load_image, to_tensor
    from vlv.inference import caption_images
    from vlv.modeling import atomic_write_text

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


def _require_empty(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not an empty dir: refusing to overwrite it")


def cmd_import_florence2(args: argparse.Namespace) -> None:
    _require_dirs(args.src)
    _require_empty(args.out)
    from vlv.official.florence2 import convert_florence2

    counts = convert_florence2(args.src, args.out)
    _print_counts(counts, f"native Florence-2 written to {args.out}")


def cmd_import_stage1(args: argparse.Namespace) -> None:
    if not args.ckpt.exists():
        raise FileNotFoundError(f"no such checkpoint: {args.ckpt}")
    _require_dirs(args.florence2, args.decoder)
    _require_empty(args.out)
    from vlv.checks import check_sd_dir

    check_sd_dir(args.decoder)
    from vlv.official.stage1 import import_stage1

    counts = import_stage1(args.ckpt, args.florence2, args.decoder, args.out)
    _print_counts(counts, f"stage-1 encoder written to {args.out}")


def cmd_import_stage2(args: argparse.Namespace) -> None:
    if not args.model_pt.exists():
        raise FileNotFoundError(f"no such checkpoint: {args.model_pt}")
    _require_dirs(args.florence2, args.decoder, args.lm)
    _require_empty(args.out)
    from vlv.checks import check_sd_dir

    check_sd_dir(args.decoder)
    from vlv.official.stage2 import import_stage2

    counts = import_stage2(args.model_pt, args.florence2, args.decoder, args.lm, args.out)
    _print_counts(counts, f"stage-2 captioner written to {args.out} "
                          f"(caption with: vlv caption IMAGES --model {args.out} --out X)")


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from vlv.shapes.demo import run_demo

    check_checkpoints(args.out)
    run_demo(args.out, recipe=args.recipe, minutes=args.minutes)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if not (args.run / "teacher" / "model_index.json").is_file():
        raise FileNotFoundError(f"{args.run} is not a VLV run dir (no teacher/model_index.json)")
    from vlv.shipped import resolve_decoder, resolve_encoder, resolve_stage2

    resolve_decoder(args.run / "teacher")
    for part, resolve in (("stage1", resolve_encoder), ("stage2", resolve_stage2)):
        if (args.run / part).is_dir():
            resolve(args.run / part)
    from vlv.shapes.evaluate import EvalSettings, evaluate_run
    from vlv.shapes.report import build_report

    settings = EvalSettings(split=args.split, n=args.n, guidance_scale=args.cfg, num_beams=args.num_beams)
    evaluate_run(args.run, settings)
    print(f"wrote {args.run / 'metrics.json'} and {build_report(args.run)}")
