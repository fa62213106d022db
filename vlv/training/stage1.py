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

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator

from vlv.config import DEFAULT_TRAINABLE, EncoderConfig
from vlv.data.caches import Cache, latents_key, latents_rows, vision_key, vision_rows, write_cache
from vlv.data.datasets import Dataset, InMemory, open_dataset
from vlv.data.images import to_tensor
from vlv.data.sampling import step_indices
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import Draws, sample_latents
from vlv.encoder import CONFIG_FILE as ENCODER_FILE
from vlv.encoder import VLVEncoder, resolved_florence2
from vlv.modeling import write_json
from vlv.shipped import resolve_decoder, resolve_encoder
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.data import StepImages, drop_bad_rows
from vlv.training.loop import check_request, global_batch, make_accelerator, train

Evaluator = Callable[[VLVEncoder, DiffusionDecoder], dict[str, float]]

STAGE1_FILE, LATENTS_DIR, VISION_DIR = "stage1.json", "latents", "vision"


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

    def __init__(self, encoder: VLVEncoder, decoder: DiffusionDecoder, data: Dataset,
                 latents: Cache | dict[str, torch.Tensor] | None = None, seed: int = 0, evaluator=None,
                 high_noise_fraction: float = 0.0, vision: Cache | None = None, image_size: int | None = None,
                 num_workers: int = 0, on_bad_image: Literal["skip", "fail"] = "skip"):
        self.encoder, self.decoder, self.seed, self.evaluator = encoder, decoder, seed, evaluator
        self.latents = TensorRows(latents) if isinstance(latents, dict) else latents
        self.high_noise_fraction, self.vision, self.on_bad_image = high_noise_fraction, vision, on_bad_image
        size = image_size or (data.size if isinstance(data, InMemory) else decoder.image_size)
        self.images = StepImages(data, size, seed, num_workers, on_bad_image)
        self.pixel_free = self.latents is not None and vision is not None
        for cache in (self.latents, vision):
            if cache is not None and len(cache) != len(self.images):
                raise ValueError(f"a cache holds {len(cache)} rows for {len(self.images)} samples")

    def trainable(self) -> torch.nn.Module:
        return self.encoder

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
            batch["images"] = to_tensor(images.numpy()).to(device)  # (B, 3, H, W) in [-1, 1]
        if self.latents is not None:
            rows = self.latents[idx]
            batch["mean"] = rows["mean"].float().to(device)
            batch["std"] = rows["std"].float().to(device)
        if self.vision is not None:
            batch["vision"] = self.vision[idx]["features"].float().to(device)  # (B, Nv, D)
        return batch

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> torch.Tensor:
        if "vision" in batch:
            z = model(image_features=batch["vision"])  # (B, Nq, d_T)
        else:
            z = model(self.encoder.normalize(batch["images"]))  # (B, Nq, d_T)
        if "mean" in batch:
            latents = sample_latents(batch["mean"], batch["std"], self.decoder.vae.config.scaling_factor, draws)
        else:
            latents = self.decoder.latents(batch["images"], draws)  # (B, C, h, w)
        return self.decoder.loss(latents, z, draws, high_noise_fraction=self.high_noise_fraction)

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}

    def close(self) -> None:
        self.images.close()


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
        source = EncoderConfig(**json.loads((run / ENCODER_FILE).read_text())["config"])
        return replace(source, text_dim=text_dim, florence2=resolved_florence2(source, run), **overrides)
    if Path(settings.encoder).is_dir():
        return EncoderConfig(text_dim=text_dim, florence2=str(Path(settings.encoder).resolve()), **overrides)
    return EncoderConfig.named(settings.encoder, text_dim, **overrides)


def check_settings(settings: Stage1Settings) -> None:
    """Refuse settings that cannot work, before minutes of loading and caching."""
    if (settings.cache_vision or settings.vision_cache) and encoder_config(settings, text_dim=1).trains_vision:
        flag = "--vision-cache" if settings.vision_cache else "--cache-vision"
        raise ValueError(f"{flag}: the vision tower of this encoder trains (trainable {settings.trainable!r}"
                         f" for {settings.encoder!r}), so its features cannot be cached")


def build_encoder(settings: Stage1Settings, text_dim: int, seed: int) -> VLVEncoder:
    """Same seed, same frozen random weights: a resumed run rebuilds the encoder it checkpointed."""
    torch.manual_seed(seed)
    return VLVEncoder(encoder_config(settings, text_dim))


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


def stage1_caches(settings: Stage1Settings, decoder: DiffusionDecoder, encoder: VLVEncoder, dataset: Dataset,
                  size: int, out: Path, accelerator: Accelerator, progress: bool = True
                  ) -> tuple[Cache | None, Cache | None]:
    """The run's latents and vision caches: a given one (``--latents-cache`` / ``--vision-cache``) is only checked
    against this run's key, else it is computed into the run dir (finished shards kept: a killed run goes on)."""
    def one(kind: str, given: str | None, wanted: bool, key_of, rows_of, batch_size: int, autocast: bool
            ) -> Cache | None:
        if not (given or wanted):
            return None
        folder = Path(given) if given else out / (LATENTS_DIR if kind == "latents" else VISION_DIR)
        key = key_of()
        if not given:
            with accelerator.autocast() if autocast else contextlib.nullcontext():  # vision: a step's precision
                write_cache(folder, key, dataset, rows_of(), batch_size, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, num_workers=settings.num_workers,
                            on_bad_image=settings.on_bad_image, progress=progress)
            accelerator.wait_for_everyone()
        return Cache(folder, want=key)

    latents = one("latents", settings.latents_cache, settings.cache_latents,
                  lambda: latents_key(decoder.vae, dataset, size), lambda: latents_rows(decoder.vae), 128, False)
    vision = None
    if settings.cache_vision or settings.vision_cache:
        encoder.to(accelerator.device)
        vision = one("vision", settings.vision_cache, settings.cache_vision,
                     lambda: vision_key(encoder, dataset, size), lambda: vision_rows(encoder), 32, True)
    return latents, vision


def train_stage1(settings: Stage1Settings, cfg: TrainConfig, out: Path, progress: bool = True,
                 evaluator: Evaluator | None = None, recipe: dict | None = None) -> VLVEncoder | None:
    """Train (or resume) a stage-1 run; returns the trained encoder, or None if stopped early (re-run resumes).

    ``evaluator(encoder, decoder)`` measures held-out data every ``cfg.eval_every`` steps; ``recipe`` (the
    resolved recipe the settings came from) is recorded in stage1.json.
    """
    check_settings(settings)
    out = Path(out)
    check_request(out, STAGE1_FILE, {"settings": asdict(settings), "train": asdict(cfg)}, cfg)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    # The frozen decoder never goes through ``prepare`` (nothing of it trains), so it is placed here.
    decoder = DiffusionDecoder.from_pretrained(resolve_decoder(settings.decoder)).to(accelerator.device)
    if settings.gradient_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    size = settings.image_size or decoder.image_size
    dataset = open_dataset(settings.data, settings.image_column, settings.caption_column)
    encoder = build_encoder(settings, decoder.text_dim, cfg.seed)
    if settings.init:  # a resumed run's checkpoint then overwrites these weights with its own
        init_from(encoder, settings.init)
    batch = global_batch(cfg, accelerator)
    write_json(out / STAGE1_FILE, {"settings": asdict(settings), "train": asdict(cfg), "image_size": size,
                                   "samples": len(dataset), "global_batch": batch,
                                   **({"recipe": recipe} if recipe else {})})
    latents, vision = stage1_caches(settings, decoder, encoder, dataset, size, out, accelerator, progress)
    task = Stage1Task(encoder, decoder, dataset, latents, seed=cfg.seed,
                      evaluator=(lambda model: evaluator(model, decoder)) if evaluator else None,
                      high_noise_fraction=settings.high_noise_fraction, vision=vision, image_size=size,
                      num_workers=settings.num_workers, on_bad_image=settings.on_bad_image)
    try:
        state = train(task, cfg, out, accelerator)
    finally:
        task.close()
    task.images.bad.save(out, accelerator, task.name)
    if not state.done:
        return None
    encoder.save_pretrained(out)
    return encoder
