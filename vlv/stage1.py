"""Stage 1 as a training task: distil the frozen diffusion decoder into the VLV encoder, images only.

The task supplies the loop (``vlv.train``) with the encoder as the trainable module and the paper's
loss: z = E(x); L = ||UNet(noisy latents, t, T(z)) - target||^2. What is frozen is cached once: the VAE's
posteriors (``cache_latents``), so a step never runs the VAE encoder, and, when the vision tower is
frozen (the official trainable set), its features (``cache_vision``), so a step never runs the DaViT.

A run dir is self-describing: ``stage1.json`` (decoder, data, settings), the encoder
(``encoder.json`` + safetensors, loadable by ``VLVEncoder.from_pretrained(run)``), ``checkpoint/`` while
training, and ``latents.safetensors`` / ``vision/`` (shards) when latents / vision features were cached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import safe_open

from vlv.data import ImageCaptionFolder, atomic_save_file, atomic_write_text, cached_latents, to_tensor
from vlv.decoder import DiffusionDecoder
from vlv.encoder import EncoderConfig, VLVEncoder
from vlv.train import TrainConfig, train
from vlv.world import shapes

STAGE1_FILE, LATENTS_FILE, VISION_DIR = "stage1.json", "latents.safetensors", "vision"


@torch.no_grad()
def cache_vision(encoder: VLVEncoder, data: ImageCaptionFolder, folder: Path, batch_size: int = 32,
                 shard_rows: int = 4096, progress: bool = True) -> None:
    """The frozen vision tower's features v' (N, Nv, D) per image, fp16, in shards of ``shard_rows`` rows.

    Why: at full scale the frozen DaViT at 768 px is about half of a step's FLOPs (1.47 of 3.07 TFLOP per
    image, counted by ``benchmarks/stage1_full.py --count-flops``), and without augmentation its output is a
    fixed function of the image. The cost is disk: N x 577 x 1024 x 2 bytes, ~1.2 MB per image for
    Florence-2-large, so the cache is written shard by shard (each atomically; a killed run keeps the finished
    shards and computes only the rest) and read memory-mapped (:class:`VisionCache`): it may exceed RAM.
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

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The sampled images, or what is cached of them: the step then never touches the pixels."""
        idx = np.random.default_rng([self.seed, step, rank]).integers(len(self.data), size=batch_size)
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
            eps = torch.randn(batch["mean"].shape, generator=generator, device=z.device)
            latents = (batch["mean"] + batch["std"] * eps) * self.decoder.vae.config.scaling_factor
        else:
            latents = self.decoder.latents(batch["images"], generator)  # (B, C, h, w)
        return self.decoder.loss(latents, z, generator, high_noise_fraction=self.high_noise_fraction)

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}


@torch.no_grad()
def reconstruct_images(encoder: VLVEncoder, decoder: DiffusionDecoder, images: torch.Tensor,
                       sampler: str = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                       batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> reconstructions (N, 3, H', W') in [-1, 1], batched."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(decoder.vae.device)
        z = encoder(encoder.normalize(x))  # (B, Nq, d_T)
        gen = torch.Generator(x.device).manual_seed(seed + start)
        out.append(decoder.reconstruct(z, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                                       generator=gen) * 2 - 1)
    return torch.cat(out)


def reconstruction_scores(encoder: VLVEncoder, decoder: DiffusionDecoder, data: ImageCaptionFolder,
                          **kwargs: Any) -> shapes.Scores:
    """Shapes data: detector on reconstructions vs the true captions."""
    from vlv.data import to_pil

    recon = reconstruct_images(encoder, decoder, to_tensor(data.images), **kwargs)
    preds = [shapes.detect(im) for im in to_pil(recon)]
    return shapes.score(preds, [shapes.parse_caption(c) for c in data.captions])


@dataclass
class Stage1Settings:
    """What a stage-1 run was made from; saved as stage1.json so the run dir describes itself."""

    decoder: str
    data: str
    encoder: str = "shapes"  # preset name or a local Florence-2 dir
    num_queries: int = 77
    trainable: str = "preset"  # preset | default | all
    image_size: int | None = None  # data resolution; default: the decoder's
    cache_latents: bool = True
    cache_vision: bool = False  # frozen vision tower only; ~1.2 MB of disk per image at full scale
    gradient_checkpointing: bool = False
    val: str | None = None
    eval_n: int = 200
    eval_sampler: str = "fast"
    high_noise_fraction: float = 0.0  # 0: the paper's uniform t; > 0 over-samples the layout-deciding upper half
    init: str | None = None  # a stage-1 run (or shipped name) whose encoder weights this run starts from
    phi_init_gain: float | None = None  # None: the encoder preset's (see EncoderConfig.phi_init_gain)


def encoder_config(settings: Stage1Settings, text_dim: int) -> EncoderConfig:
    """The encoder a run trains, as a config: cheap, so settings can be checked before anything loads."""
    overrides: dict[str, Any] = {"num_queries": settings.num_queries}
    if settings.phi_init_gain is not None:
        overrides["phi_init_gain"] = settings.phi_init_gain
    if settings.trainable == "all":
        overrides["trainable"] = "all"
    elif settings.trainable == "default":
        overrides["trainable"] = list(EncoderConfig.__dataclass_fields__["trainable"].default_factory())
    if Path(settings.encoder).is_dir():
        return EncoderConfig(text_dim=text_dim, florence2=str(Path(settings.encoder).resolve()), **overrides)
    return EncoderConfig.preset(settings.encoder, text_dim, **overrides)


def check_settings(settings: Stage1Settings) -> None:
    """Refuse settings that cannot work, before minutes of loading and caching."""
    if settings.cache_vision and encoder_config(settings, text_dim=1).trains_vision:
        raise ValueError(f"--cache-vision: the vision tower of this encoder trains (trainable {settings.trainable!r}"
                         f" for {settings.encoder!r}), so its features cannot be cached")
    if settings.init and settings.phi_init_gain is not None:
        raise ValueError(f"--phi-init-gain scales phi's freshly initialised weights, but --init {settings.init}"
                         " overwrites them with trained ones; pass one or the other")


def build_encoder(settings: Stage1Settings, text_dim: int, seed: int) -> VLVEncoder:
    """Same seed, same frozen random weights: a resumed run rebuilds the encoder it checkpointed."""
    torch.manual_seed(seed)
    return VLVEncoder(encoder_config(settings, text_dim))


def init_from(encoder: VLVEncoder, init: str) -> None:
    """Warm start: copy every weight of a trained stage-1 encoder into ``encoder``, strictly.

    Why: a run trained elsewhere (say, minutes on a GPU) continues here with a new schedule and optimizer;
    the architecture must be the same, so the two configs are compared first. One difference is allowed:
    fewer queries, which take the source's first Nq. The query decoder's self-attention is causal, so the new
    encoder's z is then exactly the first Nq positions of the source's z (the Nq ablation starts from there).
    """
    from vlv.presets import resolve_encoder

    source = VLVEncoder.from_pretrained(resolve_encoder(init))
    keys = ("florence2", "image_size", "text_dim", "prompt_ids")
    diff = [k for k in keys if getattr(source.config, k) != getattr(encoder.config, k)]
    nq, source_nq = encoder.config.num_queries, source.config.num_queries
    if nq > source_nq:
        diff.append(f"num_queries ({nq} > its {source_nq})")
    if diff:
        raise ValueError(f"--init {init}: its encoder differs from this run's in {', '.join(diff)}")
    state = source.state_dict()
    state["queries"] = state["queries"][:, :nq]  # (1, Nq, D): the source's first Nq queries
    encoder.load_state_dict(state, strict=True)


def train_stage1(settings: Stage1Settings, cfg: TrainConfig, out: Path, progress: bool = True) -> VLVEncoder | None:
    """Train (or resume) a stage-1 run; returns the trained encoder, or None if stopped early (re-run resumes)."""
    from vlv.presets import resolve_decoder

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
    meta = {"settings": asdict(settings), "train": asdict(cfg), "image_size": size}
    atomic_write_text(out / STAGE1_FILE, json.dumps(meta, indent=2) + "\n")

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

    evaluator = None
    if settings.val:
        val = ImageCaptionFolder(Path(settings.val), size, limit=settings.eval_n)

        def evaluator(model: VLVEncoder) -> dict[str, float]:
            s = reconstruction_scores(model, decoder, val, sampler=settings.eval_sampler)
            return {"recon_scene_accuracy": s.scene_accuracy, "recon_object_f1": s.object_f1}

    task = Stage1Task(encoder, decoder, data, latents, seed=cfg.seed, evaluator=evaluator,
                      high_noise_fraction=settings.high_noise_fraction, vision=vision)
    state = train(task, cfg, out, accelerator)
    if not state.done:
        return None
    encoder.save_pretrained(out)
    return encoder
