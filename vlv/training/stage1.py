"""Stage 1 as a training task: distil the frozen diffusion decoder into the VLV encoder, images only.

The task supplies the loop (``vlv.training.loop``) with the encoder as the trainable module and the paper's
loss: z = E(x); L = ||UNet(noisy latents, t, T(z)) - target||^2. What is frozen is cached once: the VAE's
posteriors (``cache_latents``), so a step never runs the VAE encoder, and, when the vision tower is
frozen (the official trainable set), its features (``cache_vision``), so a step never runs the DaViT.

A run dir is self-describing: ``stage1.json`` (decoder, data, settings, the resolved recipe), the encoder
(``encoder.json`` + safetensors, loadable by ``VLVEncoder.from_pretrained(run)``), ``checkpoint/`` while
training, and ``latents.safetensors`` / ``vision/`` (shards) when latents / vision features were cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import safe_open

from vlv.config import DEFAULT_TRAINABLE, EncoderConfig
from vlv.data import ImageCaptionFolder, cached_latents, to_tensor
from vlv.datasets import step_indices
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import sample_latents
from vlv.encoder import CONFIG_FILE as ENCODER_FILE
from vlv.encoder import VLVEncoder, resolved_florence2
from vlv.modeling import atomic_save_file, write_json
from vlv.shipped import resolve_decoder, resolve_encoder
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.loop import train

Evaluator = Callable[[VLVEncoder, DiffusionDecoder], dict[str, float]]

STAGE1_FILE, LATENTS_FILE, VISION_DIR = "stage1.json", "latents.safetensors", "vision"


@torch.no_grad()
def cache_vision(encoder: VLVEncoder, data: ImageCaptionFolder, folder: Path, batch_size: int = 32,
                 shard_rows: int = 4096, progress: bool = True) -> None:
    """The frozen vision tower's features v' (N, Nv, D) per image, fp16, in shards of ``shard_rows`` rows.

    Why: at full scale the frozen DaViT at 768 px is a large share of a step's FLOPs
    (``benchmarks/stage1_full.py --count-flops`` counts it), and without augmentation its output is a fixed
    function of the image. The cost is disk: N x Nv x D x 2 bytes, so the cache is written shard by shard (each
    atomically; a killed run keeps the finished shards and computes only the rest) and read
    memory-mapped (:class:`VisionCache`): it may exceed RAM.
    """
    from tqdm.auto import tqdm

    if not encoder.vision_frozen:
        raise ValueError("cache_vision: this encoder's vision tower trains, so its features change every step")
    folder.mkdir(parents=True, exist_ok=True)
    device, was_training = next(encoder.parameters()).device, encoder.training
    encoder.eval()  # as in training, where the frozen tower is kept in eval mode (no drop-path)
    starts = range(0, len(data), shard_rows)
    for start in tqdm(starts, desc="caching vision features", unit="shard", disable=not progress):
        path = folder / f"{start // shard_rows:05d}.safetensors"
        if path.exists():
            continue
        rows = np.arange(start, min(start + shard_rows, len(data)))
        feats = []
        for i in range(0, len(rows), batch_size):
            x = to_tensor(data.images[rows[i : i + batch_size]]).to(device)  # (B, 3, H, W)
            v = encoder.image_features(encoder.normalize(x))  # (B, Nv, D)
            if not torch.isfinite(v).all() or v.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError("vision features do not fit fp16: cache_vision cannot store them")
            feats.append(v.half().cpu())
        atomic_save_file({"features": torch.cat(feats).contiguous()}, path)
    encoder.train(was_training)


class VisionCache:
    """The cached features of :func:`cache_vision`, memory-mapped: a batch reads only its own rows."""

    def __init__(self, folder: Path):
        parts = sorted(Path(folder).glob("*.safetensors"))
        self._rows = [safe_open(str(p), framework="pt").get_slice("features") for p in parts]
        sizes = [r.get_shape()[0] for r in self._rows]
        self._starts = np.cumsum([0, *sizes])  # row offsets of the shards

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, idx: np.ndarray) -> torch.Tensor:
        shard = np.searchsorted(self._starts, idx, side="right") - 1  # (B,) which shard holds each row
        local = np.asarray(idx) - self._starts[shard]  # (B,) its row within that shard
        return torch.cat([self._rows[s][int(r) : int(r) + 1] for s, r in zip(shard, local, strict=True)])


class Stage1Task:
    """Trainable: the encoder. Loss: the decoder's diffusion loss on the encoder's z (paper Eq. 2)."""

    name = "stage1"

    def __init__(self, encoder: VLVEncoder, decoder: DiffusionDecoder, data: ImageCaptionFolder,
                 latents: dict[str, torch.Tensor] | None = None, seed: int = 0, evaluator=None,
                 high_noise_fraction: float = 0.0, vision: VisionCache | None = None):
        self.encoder, self.decoder, self.data, self.latents = encoder, decoder, data, latents
        self.seed, self.evaluator, self.high_noise_fraction = seed, evaluator, high_noise_fraction
        self.vision = vision

    def trainable(self) -> torch.nn.Module:
        return self.encoder

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        """The sampled images, or what is cached of them: the step then never touches the pixels."""
        idx = step_indices(len(self.data), self.seed, step, rank, world_size, batch_size)
        batch = {}
        if self.latents is None or self.vision is None:
            batch["images"] = to_tensor(self.data.images[idx]).to(device)  # (B, 3, H, W) in [-1, 1]
        if self.latents is not None:
            t = torch.from_numpy(idx)
            batch["mean"] = self.latents["mean"][t].float().to(device)
            batch["std"] = self.latents["std"][t].float().to(device)
        if self.vision is not None:
            batch["vision"] = self.vision[idx].float().to(device)  # (B, Nv, D)
        return batch

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        if "vision" in batch:
            z = model(image_features=batch["vision"])  # (B, Nq, d_T)
        else:
            z = model(self.encoder.normalize(batch["images"]))  # (B, Nq, d_T)
        if "mean" in batch:
            latents = sample_latents(batch["mean"], batch["std"], self.decoder.vae.config.scaling_factor, generator)
        else:
            latents = self.decoder.latents(batch["images"], generator)  # (B, C, h, w)
        return self.decoder.loss(latents, z, generator, high_noise_fraction=self.high_noise_fraction)

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}


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
    if settings.cache_vision and encoder_config(settings, text_dim=1).trains_vision:
        raise ValueError(f"--cache-vision: the vision tower of this encoder trains (trainable {settings.trainable!r}"
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


def train_stage1(settings: Stage1Settings, cfg: TrainConfig, out: Path, progress: bool = True,
                 evaluator: Evaluator | None = None, recipe: dict | None = None) -> VLVEncoder | None:
    """Train (or resume) a stage-1 run; returns the trained encoder, or None if stopped early (re-run resumes).

    ``evaluator(encoder, decoder)`` measures held-out data every ``cfg.eval_every`` steps; ``recipe`` (the
    resolved recipe the settings came from) is recorded in stage1.json.
    """
    check_settings(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    # The frozen decoder never goes through ``prepare`` (nothing of it trains), so it is placed here.
    decoder = DiffusionDecoder.from_pretrained(resolve_decoder(settings.decoder)).to(accelerator.device)
    if settings.gradient_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    size = settings.image_size or decoder.image_size
    data = ImageCaptionFolder(Path(settings.data), size, progress=progress)
    encoder = build_encoder(settings, decoder.text_dim, cfg.seed)
    if settings.init:  # a resumed run's checkpoint then overwrites these weights with its own
        init_from(encoder, settings.init)
    write_json(out / STAGE1_FILE, {"settings": asdict(settings), "train": asdict(cfg), "image_size": size,
                                   **({"recipe": recipe} if recipe else {})})

    latents = None
    if settings.cache_latents:
        cache = out / LATENTS_FILE
        with accelerator.main_process_first():  # one process writes the cache, the others then read it
            latents = cached_latents(decoder.vae, data, cache)
        if len(latents["mean"]) != len(data):
            raise ValueError(f"{cache} holds {len(latents['mean'])} latents for {len(data)} images: delete it")

    vision = None
    if settings.cache_vision:
        cache = out / VISION_DIR
        with accelerator.main_process_first(), accelerator.autocast():  # the run's precision, as a step's
            if accelerator.is_main_process:  # finished shards are kept: a killed run goes on from them
                cache_vision(encoder.to(accelerator.device), data, cache, progress=progress)
        vision = VisionCache(cache)
        if len(vision) != len(data):
            raise ValueError(f"{cache} holds {len(vision)} feature rows for {len(data)} images: delete it")

    task = Stage1Task(encoder, decoder, data, latents, seed=cfg.seed,
                      evaluator=(lambda model: evaluator(model, decoder)) if evaluator else None,
                      high_noise_fraction=settings.high_noise_fraction, vision=vision)
    state = train(task, cfg, out, accelerator)
    if not state.done:
        return None
    encoder.save_pretrained(out)
    return encoder
