"""Stage 1 as a training task: distil the frozen diffusion decoder into the VLV encoder, images only.

The task supplies the loop (``vlv.training.loop``) with the encoder as the trainable module and the paper's
loss: z = E(x); L = ||UNet(noisy latents, t, T(z)) - target||^2. What is frozen is cached once: the VAE's
posteriors, so a step never runs the VAE encoder, and, when the vision tower is frozen (the official trainable
set), its features, so a step never runs the DaViT (:mod:`vlv.data.caches`: sharded, memory-mapped, keyed).

A run dir is self-describing: ``stage1.json`` (decoder, data, settings, the resolved recipe), the encoder
(``encoder.json`` + safetensors, loadable by ``VLVEncoder.from_pretrained(run)``), ``checkpoint/`` while
training, ``latents/`` / ``vision/`` (:mod:`vlv.data.caches` shards) when latents / vision features were cached in the
run (``--latents-cache`` / ``--vision-cache`` name caches made by ``vlv precompute`` instead), and ``data.json``
(the bad samples skipped).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline

from vlv.checks import (
    check_checkpoints,
    check_name_or_path,
    check_native_florence2,
    read_json,
    require_data,
    require_dirs,
    text_length,
    text_width,
)
from vlv.config import CACHE_SHARD_ROWS, DEFAULT_TRAINABLE, EncoderConfig, list_encoders
from vlv.data.caches import Cache
from vlv.data.datasets import Dataset, InMemory, open_dataset, require_readable
from vlv.data.images import to_tensor
from vlv.data.outputs import process_state
from vlv.data.sampling import step_indices
from vlv.decoder import DiffusionDecoder
from vlv.encoder import CONFIG_FILE as ENCODER_FILE
from vlv.encoder import VLVEncoder, resolved_florence2
from vlv.errors import InvalidInput
from vlv.modeling import write_json
from vlv.shipped import is_shipped, resolve_decoder, resolve_encoder
from vlv.training.caches import KINDS, Kind, build_cache, run_caches
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.data import StepImages, drop_bad_rows, open_val
from vlv.training.draws import Draws, step_seed
from vlv.training.loop import Loss, global_batch, make_accelerator, train, write_once
from vlv.training.recipes import user_input
from vlv.training.resume import check_request
from vlv.training.tracking import ImageGrid, Texts, image_grid

Evaluator = Callable[[VLVEncoder, DiffusionDecoder], dict[str, float | ImageGrid | Texts]]

STAGE1_FILE = "stage1.json"
SAMPLES = 4  # held-out images an evaluation shows (reconstructions here, captions in stage 2)


class TensorRows:
    """In-memory rows ({"mean", "std"} posteriors, or {"features"}: (N, ...)), read like a
    :class:`vlv.data.caches.Cache`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.ok = np.ones(len(next(iter(tensors.values()))), dtype=bool)

    def __len__(self) -> int:
        return len(self.ok)

    def __getitem__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(np.asarray(idx))
        return {k: v[t] for k, v in self.tensors.items()}


class Stage1Task:
    """Trainable: the encoder. Loss: the decoder's diffusion loss on the encoder's z (paper Eq. 2).

    ``data`` is a :mod:`vlv.data.datasets` dataset (decoded by workers, ``num_workers``; an :class:`InMemory` one
    is decoded already); ``latents`` / ``vision`` are caches (:class:`vlv.data.caches.Cache`) of the frozen parts.
    With both, a step reads only its cache rows and never decodes an image.
    """

    name = "stage1"
    unit = "images"  # what a loss's count counts: the trackers' throughput

    def __init__(self, encoder: VLVEncoder, decoder: DiffusionDecoder, data: Dataset,
                 latents: Cache | dict[str, torch.Tensor] | None = None, seed: int = 0, evaluator=None,
                 high_noise_fraction: float = 0.0, vision: Cache | None = None, image_size: int | None = None,
                 num_workers: int = 0, on_bad_image: Literal["skip", "fail"] = "skip", record: Path | None = None):
        self.encoder, self.decoder, self.seed, self.evaluator = encoder, decoder, seed, evaluator
        self.record = record  # the run's stage1.json, copied into exports (stage 2 reads the decoder there)
        self.latents = TensorRows(latents) if isinstance(latents, dict) else latents
        self.high_noise_fraction, self.vision, self.on_bad_image = high_noise_fraction, vision, on_bad_image
        size = image_size or (data.size if isinstance(data, InMemory) else decoder.image_size)
        # The encoder's crop at the data resolution: the VAE and the encoder read the same square.
        self.images = StepImages(data, encoder.transform.at(size).crop, seed, num_workers, on_bad_image)
        self.pixel_free = self.latents is not None and vision is not None
        for cache in (self.latents, vision):
            if cache is not None and len(cache) != len(self.images):
                raise ValueError(f"a cache holds {len(cache)} rows for {len(self.images)} samples")

    def trainable(self) -> torch.nn.Module:
        return self.encoder

    def export(self, out: Path) -> None:
        """A stage-1 run dir of the weights so far: VLVEncoder.from_pretrained and stage 2 take it as they are."""
        self.encoder.save_pretrained(out)
        if self.record is not None:
            shutil.copyfile(self.record, out / self.record.name)

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        """The sampled images, or what is cached of them: with both caches the step never touches the pixels."""
        batch = {}
        if self.pixel_free:
            idx = step_indices(len(self.images), self.seed, step, rank, world_size, batch_size)
        else:
            got = self.images.get(step, rank, world_size, batch_size)
            idx, images = got["indices"].numpy(), got["images"]  # (B',), (B', H, W, 3) uint8
        ok = np.ones(len(idx), dtype=bool)
        for cache in (self.latents, self.vision):
            if cache is not None:
                ok &= cache.ok[idx]
        keep = drop_bad_rows(idx, ok, self.images, step, rank, self.on_bad_image)
        if not keep.all():
            idx = idx[keep]
            images = images[torch.from_numpy(keep)] if not self.pixel_free else None
        if not len(idx):
            raise ValueError(f"step {step}: every sample of the batch was bad (see {self.images.where(0)}'s data)")
        if not self.pixel_free:
            batch["images"] = to_tensor(images.numpy()).to(device)  # (B, 3, H, W) in [-1, 1], the VAE's input
            if self.vision is None:
                batch["pixel_values"] = self.encoder.transform.pixels(images, device)  # (B, 3, S, S)
        if self.latents is not None:
            rows = self.latents[idx]
            batch["mean"] = rows["mean"].float().to(device)
            batch["std"] = rows["std"].float().to(device)
        if self.vision is not None:
            batch["vision"] = self.vision[idx]["features"].float().to(device)  # (B, Nv, D)
        return batch

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> Loss:
        """The diffusion loss, a mean over the batch's samples."""
        return stage1_loss(self.decoder, model, batch, draws, self.high_noise_fraction)

    def evaluate(self, model) -> dict[str, float | ImageGrid | Texts]:
        return self.evaluator(model) if self.evaluator is not None else {}

    def close(self) -> None:
        self.images.close()


def stage1_loss(decoder: DiffusionDecoder, model, batch: dict[str, torch.Tensor], draws,
                high_noise_fraction: float = 0.0) -> Loss:
    """One step's loss over a batch as :meth:`Stage1Task.batch` makes it (``vlv.training.plan`` runs the same one
    on shapes alone): ``model`` is the encoder as the loop wraps it."""
    if "vision" in batch:
        z = model(image_features=batch["vision"])  # (B, Nq, d_T)
    else:
        z = model(batch["pixel_values"])  # (B, Nq, d_T)
    if "mean" in batch:
        latents = decoder.posterior_latents(batch["mean"], batch["std"], draws)  # (B, C, h, w)
    else:
        latents = decoder.latents(batch["images"], draws)  # (B, C, h, w)
    return Loss(decoder.loss(latents, z, draws, high_noise_fraction=high_noise_fraction), len(z))


# ------------------------------------------------------------------------------------ held-out loss
class ImageDraws:
    """Random draws fixed per held-out image: image i's posterior sample, timestep and noise come from its own
    generator (seed, i), so every evaluation scores each image at the same t and noise, in any batch (diffusers'
    training examples fix their validation draws likewise): the held-out loss moves only when the weights do."""

    def __init__(self, seed: int, images: range, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(step_seed(seed, i)) for i in images]

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype)
                            for g in self.generators])

    def randint(self, low: int, high: int, b: int, device: torch.device | str) -> torch.Tensor:
        return torch.cat([torch.randint(low, high, (1,), generator=g, device=device) for g in self.generators])

    def rand(self, b: int, device: torch.device | str) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g, device=device) for g in self.generators])


@torch.no_grad()
def held_out_loss(encoder: VLVEncoder, decoder: DiffusionDecoder, data: InMemory, seed: int = 0,
                  batch_size: int = 8) -> float:
    """The stage-1 loss (uniform t) on held-out images, mean over them, with draws fixed per image."""
    device = decoder.device
    total = 0.0
    for start in range(0, len(data), batch_size):
        images = torch.from_numpy(data.images[start:start + batch_size])  # (B, H, W, 3) uint8
        draws = ImageDraws(seed, range(start, start + len(images)), device)
        z = encoder(encoder.transform.pixels(images, device))  # (B, Nq, d_T)
        latents = decoder.latents(to_tensor(images.numpy()).to(device), draws)  # (B, C, h, w)
        total += decoder.loss(latents, z, draws).item() * len(images)
    return total / len(data)


@torch.no_grad()
def reconstructions(encoder: VLVEncoder, decoder: DiffusionDecoder, images: np.ndarray, seed: int = 0) -> ImageGrid:
    """Held-out images (N, H, W, 3) uint8 over their caption-free reconstructions by the decoder's fast sampler,
    from noise fixed by ``seed`` (drawn on the CPU, as ``vlv.inference`` draws it): a grid that changes only as
    the weights do."""
    device = next(decoder.unet.parameters()).device
    z = encoder(encoder.transform.pixels(images, device))  # (N, Nq, d_T)
    side = images.shape[1]
    out = decoder.reconstruct(z.to(decoder.unet.dtype), sampler="fast", height=side, width=side,
                              generator=torch.Generator().manual_seed(seed))  # (N, 3, H, W) in [0, 1]
    recon = out.float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return image_grid([images, recon])


def val_loss_evaluator(val: str | Path, n: int, seed: int = 0, samples: int = SAMPLES) -> Evaluator:
    """``evaluator(encoder, decoder)`` for ``train_stage1`` on any image data (folder, tars, parquet): the
    held-out loss on its first ``n`` images (read once, at the decoder's resolution), and the first ``samples``
    of them over their reconstructions (``reconstructions``). The data is checked now, before a run loads
    anything."""
    dataset = open_val(val)
    cache: dict[int, InMemory] = {}

    def evaluate(encoder: VLVEncoder, decoder: DiffusionDecoder) -> dict[str, float | ImageGrid | Texts]:
        size = decoder.image_size
        if size not in cache:
            cache[size] = InMemory(dataset, size, limit=n, skip_bad=True)
        data = cache[size]
        shown = {"reconstructions": reconstructions(encoder, decoder, data.images[:samples], seed)} if samples else {}
        return {"val_loss": held_out_loss(encoder, decoder, data, seed), **shown}

    return evaluate


def encoder_config(settings: Stage1Settings, text_dim: int) -> EncoderConfig:
    """The encoder a run trains, as a config: cheap, so settings can be checked before anything loads."""
    overrides: dict[str, Any] = {"num_queries": settings.num_queries}
    if settings.phi_init_gain is not None:
        overrides["phi_init_gain"] = settings.phi_init_gain
    if settings.trainable == "all":
        overrides["trainable"] = "all"
    elif settings.trainable == "official":
        overrides["trainable"] = list(DEFAULT_TRAINABLE)
    if settings.init:  # the architecture is the source run's, so any stage-1 run dir (an imported one too) goes on
        run = resolve_encoder(settings.init)
        source = EncoderConfig(**read_json(run / ENCODER_FILE, keys=("config",))["config"])
        return replace(source, text_dim=text_dim, florence2=resolved_florence2(source, run), **overrides)
    if Path(settings.encoder).is_dir():
        florence2 = check_native_florence2(settings.encoder)  # a remote-code dir: one line naming the converter
        return EncoderConfig(text_dim=text_dim, florence2=str(florence2.resolve()), **overrides)
    return EncoderConfig.named(settings.encoder, text_dim, **overrides)


def check_settings(settings: Stage1Settings, config: EncoderConfig) -> None:
    """Refuse settings that cannot work together, before minutes of loading and caching."""
    if settings.init and settings.phi_init_gain is not None:
        raise InvalidInput(f"phi_init_gain scales phi's freshly initialised weights, but init {settings.init} "
                           "overwrites them with trained ones; pass one or the other")
    if (settings.cache_vision or settings.vision_cache) and config.trains_vision:
        flag = "--vision-cache" if settings.vision_cache else "--cache-vision"
        raise InvalidInput(f"{flag}: the vision tower of this encoder trains (trainable {settings.trainable!r}"
                           f" for {settings.encoder!r}), so its features cannot be cached")


def frozen_decoder(pipe: DiffusionPipeline | DiffusionDecoder, settings: Stage1Settings) -> DiffusionDecoder:
    """The frozen decoder a run with these settings trains against (denoiser gradient checkpointing as asked:
    diffusers checkpoints whenever grad is on, in train or eval mode, so gradients still reach z through it)."""
    decoder = pipe if isinstance(pipe, DiffusionDecoder) else DiffusionDecoder(pipe)
    if settings.gradient_checkpointing:
        decoder.enable_gradient_checkpointing()
    return decoder


def data_size(settings: Stage1Settings, decoder: DiffusionDecoder) -> int:
    """The resolution images are read at (the VAE's input; the encoder resizes them to its own image_size)."""
    return settings.image_size or decoder.image_size


def build_encoder(settings: Stage1Settings, text_dim: int, seed: int) -> VLVEncoder:
    """The encoder a run with these settings trains, before training."""
    return seeded_encoder(encoder_config(settings, text_dim), seed)


def seeded_encoder(config: EncoderConfig, seed: int) -> VLVEncoder:
    """Same seed, same frozen random weights: a resumed run rebuilds the encoder it checkpointed."""
    torch.manual_seed(seed)
    return VLVEncoder(config)


def init_from(encoder: VLVEncoder, init: str) -> None:
    """Warm start: copy every weight of a trained stage-1 encoder into ``encoder``, strictly.

    Why: a run trained elsewhere (say, minutes on a GPU, or by the official code and imported) continues here with
    a new schedule and optimizer; the architecture must be the same (a run with ``init`` takes it from the source,
    see :func:`encoder_config`), so the two configs are compared first. One difference is allowed:
    fewer queries, which take the source's first Nq. The query decoder's self-attention is causal, so the new
    encoder's z is then exactly the first Nq positions of the source's z (the Nq ablation starts from there).
    """
    source = VLVEncoder.from_pretrained(init)
    keys = ("image_size", "text_dim", "prompt_ids")
    diff = [k for k in keys if getattr(source.config, k) != getattr(encoder.config, k)]
    if resolved_florence2(source.config, resolve_encoder(init)) != encoder.config.florence2:
        diff.insert(0, "florence2")
    nq, source_nq = encoder.config.num_queries, source.config.num_queries
    if nq > source_nq:
        diff.append(f"num_queries ({nq} > its {source_nq})")
    if diff:
        raise ValueError(f"--init {init}: its encoder differs from this run's in {', '.join(diff)}")
    state = source.state_dict()
    state["queries"] = state["queries"][:, :nq]  # (1, Nq, D): the source's first Nq queries
    encoder.load_state_dict(state, strict=True)


@dataclass
class Stage1Plan:
    """A stage-1 run whose inputs are all checked: what :func:`run_stage1` trains, nothing left to resolve."""

    settings: Stage1Settings
    train: TrainConfig
    out: Path
    decoder: Path  # the Stable Diffusion dir
    dataset: Dataset  # opened (indexed, rows typed) once
    encoder: EncoderConfig  # the architecture the run trains
    evaluator: Evaluator | None = None
    recipe: dict | None = None


def prepare_stage1(settings: Stage1Settings, cfg: TrainConfig, out: str | Path, evaluator: Evaluator | None = None,
                   recipe: dict | None = None, gpu_memory: float | None = None) -> Stage1Plan:
    """Check every input of a stage-1 run, reading only configs, headers and the data's index (no model loads,
    nothing is created): a mistake is one line before minutes of loading. ``evaluator(encoder, decoder)`` measures
    held-out data every ``cfg.eval_every`` steps; ``recipe`` (the resolved recipe) is recorded in stage1.json.
    On a GPU (or given ``gpu_memory`` GiB) a run whose step does not fit is refused (:mod:`vlv.training.plan`)."""
    out = Path(out)
    decoder = resolve_decoder(settings.decoder)
    if settings.init:
        init_queries = read_json(resolve_encoder(settings.init) / ENCODER_FILE)["config"]["num_queries"]
        if settings.num_queries > init_queries:
            raise InvalidInput(f"--nq {settings.num_queries}: more queries than --init {settings.init} has "
                               f"({init_queries}); a warm start keeps its first Nq")
    require_data(settings.data)
    for cache in (settings.latents_cache, settings.vision_cache):
        if cache is not None:
            require_dirs(cache)
            Cache(cache)  # made and finished: what it was made from is checked once the models load
    check_name_or_path(settings.encoder, list_encoders(), "named encoder", "--encoder")
    limit = text_length(decoder)
    if settings.num_queries > limit:
        raise InvalidInput(f"--nq {settings.num_queries}: the decoder's text encoder has only {limit} positions")
    with user_input():
        config = encoder_config(settings, text_width(decoder))  # an unknown encoder name fails here
    check_settings(settings, config)
    dataset = open_dataset(settings.data, settings.image_column, settings.caption_column)
    if not len(dataset):
        raise InvalidInput(f"{settings.data}: no samples")
    if not (settings.latents_cache and settings.vision_cache):  # with both given, a step never decodes an image
        require_readable(dataset, settings.data)
    check_checkpoints(out)
    check_request(out, STAGE1_FILE, {"settings": asdict(settings), "train": asdict(cfg)}, cfg)
    from vlv.training.plan import check_memory, plan_stage1, world_size  # it builds on this module

    check_memory(lambda: plan_stage1(settings, cfg, world_size(), len(dataset), (recipe or {}).get("name"),
                                     decoder=decoder, config=config), gpu_memory)
    return Stage1Plan(settings, cfg, out, decoder, dataset, config, evaluator, recipe)


def train_stage1(settings: Stage1Settings, cfg: TrainConfig, out: str | Path, progress: bool = True,
                 evaluator: Evaluator | None = None, recipe: dict | None = None,
                 gpu_memory: float | None = None) -> VLVEncoder | None:
    """Check (:func:`prepare_stage1`), then train or resume a stage-1 run; returns the trained encoder, or None
    if stopped early (a re-run resumes)."""
    return run_stage1(prepare_stage1(settings, cfg, out, evaluator, recipe, gpu_memory), progress)


def run_stage1(plan: Stage1Plan, progress: bool = True) -> VLVEncoder | None:
    """Train (or resume) a prepared stage-1 run; returns the trained encoder, or None if stopped early."""
    settings, cfg, out = plan.settings, plan.train, plan.out
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, out)
    # The frozen decoder never goes through ``prepare`` (nothing of it trains), so it is placed here.
    decoder = frozen_decoder(DiffusionDecoder.from_pretrained(plan.decoder), settings).to(accelerator.device)
    size = data_size(settings, decoder)
    # The encoder records the crop it trains on, so inference cuts images as training did.
    encoder = seeded_encoder(replace(plan.encoder, crop_size=size), cfg.seed)
    if settings.init:  # a resumed run's checkpoint then overwrites these weights with its own
        init_from(encoder, settings.init)
    batch = global_batch(cfg, accelerator)
    decoder_source = settings.decoder if is_shipped(settings.decoder) else str(plan.decoder.resolve())
    write_json(out / STAGE1_FILE, {"settings": asdict(settings), "train": asdict(cfg), "image_size": size,
                                   "decoder": decoder_source, "samples": len(plan.dataset), "global_batch": batch,
                                   **({"recipe": plan.recipe} if plan.recipe else {})})
    latents, vision = run_caches(settings, decoder, encoder, plan.dataset, encoder.transform.crop, out, accelerator,
                                 progress)
    evaluator = plan.evaluator
    task = Stage1Task(encoder, decoder, plan.dataset, latents, seed=cfg.seed,
                      evaluator=(lambda model: evaluator(model, decoder)) if evaluator else None,
                      high_noise_fraction=settings.high_noise_fraction, vision=vision, image_size=size,
                      num_workers=settings.num_workers, on_bad_image=settings.on_bad_image,
                      record=out / STAGE1_FILE)
    try:
        state = train(task, cfg, out, accelerator)
    finally:
        task.close()
    task.images.bad.save(out, accelerator, task.name)
    if not state.done:
        return None
    write_once(encoder, lambda: encoder.save_pretrained(out))
    return encoder


def stage1_record(encoder: str | Path) -> dict | None:
    """The stage1.json of a stage-1 run dir or shipped name; None for an encoder dir without one (imported from the
    official code, or saved by hand)."""
    path = resolve_encoder(encoder) / STAGE1_FILE
    return read_json(path) if path.is_file() else None


def recorded_decoder(record: dict) -> str:
    """The decoder a stage-1 run trained against: a shipped name or an absolute path (an older run recorded the
    path as given, read from the current dir)."""
    return record.get("decoder") or record["settings"]["decoder"]


# ------------------------------------------------------------------------------------------ precompute
@dataclass
class Precomputed:
    """What one process of a precompute did."""

    rank: int
    world: int
    samples: int
    image_size: int
    bad: int


def precompute(kind: Kind, decoder: str | Path, data: str, out: str | Path, encoder: str | None = None,
               trainable: str = "config", seed: int = 0, image_size: int | None = None, batch_size: int | None = None,
               shard_rows: int = CACHE_SHARD_ROWS, num_workers: int = 2,
               on_bad_image: Literal["skip", "fail"] = "skip", precision: Literal["no", "bf16"] = "no",
               image_column: str = "image", caption_column: str = "caption", progress: bool = True,
               gpu_memory: float | None = None) -> Precomputed:
    """Cache what a stage-1 run keeps frozen, once, for any number of runs (this process's shards).

    ``encoder`` (vision only) is a stage-1 run dir, or a named encoder / Florence-2 dir built as a stage-1 run with
    this ``trainable`` and ``seed`` builds it. Every input is checked before a model loads; on a GPU (or given
    ``gpu_memory`` GiB) a batch whose forward does not fit is refused (:mod:`vlv.training.plan`).
    """
    if kind not in KINDS:
        raise InvalidInput(f"nothing to precompute of {kind!r}: choose {' or '.join(KINDS)}")
    if num_workers < 0:
        raise InvalidInput(f"--num-workers must be >= 0, got {num_workers}")
    decoder_dir = resolve_decoder(decoder)
    require_data(data)
    vision_config = _vision_encoder_config(encoder, decoder, data, trainable, decoder_dir) if kind == "vision" else None
    dataset = open_dataset(data, image_column, caption_column)
    if not len(dataset):
        raise InvalidInput(f"{data}: no samples")
    require_readable(dataset, data)  # else a cache of empty rows
    from vlv.training.plan import check_memory, plan_precompute  # it builds on this module

    check_memory(lambda: plan_precompute(kind, decoder_dir, image_size, batch_size,
                                         vision_config if vision_config is not None else encoder, precision),
                 gpu_memory)
    state = process_state()
    model = DiffusionDecoder.from_pretrained(decoder_dir)
    size = image_size or model.image_size
    vision = None
    if kind == "vision":
        vision = (VLVEncoder.from_pretrained(encoder) if vision_config is None
                  else seeded_encoder(vision_config, seed)).to(state.device)
        model = None  # only its VAE's resolution was needed
    else:
        model.vae.to(state.device)
    autocast = torch.autocast(state.device.type, dtype=torch.bfloat16) if kind == "vision" and precision == "bf16" \
        else None
    crop = vision.transform.at(size).crop if vision is not None else size  # as a run with this encoder cuts
    bad = build_cache(kind, out, dataset, crop, state, model, vision, batch_size=batch_size, shard_rows=shard_rows,
                      num_workers=num_workers, on_bad_image=on_bad_image, autocast=autocast, progress=progress)
    return Precomputed(state.process_index, state.num_processes, len(dataset), size, bad)


def _vision_encoder_config(encoder: str | None, decoder: str | Path, data: str, trainable: str,
                           decoder_dir: Path) -> EncoderConfig | None:
    """None for a stage-1 run dir (it loads as it is); else the config a stage-1 run would build from the name."""
    if encoder is None:
        raise InvalidInput("precompute vision needs --encoder")
    if (Path(encoder) / ENCODER_FILE).is_file() or encoder == "shapes-stage1":
        resolve_encoder(encoder)
        return None
    check_name_or_path(encoder, list_encoders(), "named encoder", "--encoder")
    with user_input():
        settings = Stage1Settings(decoder=str(decoder), data=str(data), encoder=encoder, trainable=trainable)
        return encoder_config(settings, text_width(decoder_dir))
