"""Stable-Diffusion-layout text-to-image models: pipeline I/O, schedulers, and the one diffusion loss.

The frozen decoder of VLV is any dir in Stable Diffusion's layout (SD 2.1-base at full scale, the shapes teacher
on a CPU); everything here reads its constants from the components' configs (``scaling_factor``,
``prediction_type``, ``num_train_timesteps``), so the same code serves both. Paper Eq. 2, the stage-1 loss:

    x_t = add_noise(x_0, noise, t),  t ~ U{0..T-1}, noise ~ N(0, I) per sample, x_0 = VAE latents * scaling
    L = || UNet(x_t, t, c) - target ||^2,  target = noise (epsilon) or the velocity (v_prediction)

:func:`diffusion_loss` is that loss for any denoiser, so the teacher's own training and stage 1 share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_loss_weighting_for_sd3
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from vlv.config import CONFIGS, DEFAULT_GUIDANCE, DEFAULT_STEPS
from vlv.data.images import to_pil
from vlv.decoders import family_of
from vlv.progress import quiet_library

Sampler = Literal["paper", "fast"]
SD_PARTS = ("unet", "vae", "text_encoder", "scheduler")


# ------------------------------------------------------------------------------------------- pipeline
def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_pipeline(path: Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load any Stable-Diffusion-layout dir (a shapes teacher or SD 2.1-base) in ``dtype``, frozen, for vlv.

    diffusers builds each part empty and reads its weights straight into ``dtype`` (``low_cpu_mem_usage``, its
    default with accelerate); the pipeline's ``device_map`` takes no ``cuda:N``, so the parts move after.
    """
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a Stable Diffusion dir (no model_index.json)")
    with quiet_library():  # dtype, not torch_dtype: diffusers 0.42 deprecates the old name with a FutureWarning
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)  # its sampling loop: vlv draws one bar per job, not per batch
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False).eval()
    return pipe.to(device)


def random_pipeline(tokenizer, config: str = "sd21-base") -> StableDiffusionPipeline:
    """A random-init pipeline from the shipped configs (``vlv/configs/<config>-{unet,vae,text_encoder,scheduler}``).

    For benchmarks without weights. SD's CLIP BPE vocabulary is not shipped, so the caller brings a tokenizer
    whose ids fit the text encoder's vocabulary.
    """
    return pipeline_from_configs(pipeline_configs(config), tokenizer)


def pipeline_configs(source: str | Path) -> dict[str, dict]:
    """Each part's config (unet, vae, text_encoder, scheduler) of a shipped config stem (``sd21-base``), or of a
    diffusers dir of any family vlv takes (its parts: ``vlv.decoders.Family.parts``, and ``model_index``, which
    names the family): the architecture alone, no weights read."""
    if (Path(source) / "model_index.json").is_file():
        family = family_of(source)
        parts = [p for p in family.parts if p not in family.tokenizers]
        files = {part: Path(source) / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
                 for part in parts}
        files["model_index"] = Path(source) / "model_index.json"
    else:
        files = {part: CONFIGS / f"{source}-{part}.json" for part in SD_PARTS}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"no decoder config {str(source)!r}: missing {', '.join(missing)}")
    return {part: json.loads(f.read_text()) for part, f in files.items()}


def pipeline_from_configs(configs: dict[str, dict], tokenizer=None) -> StableDiffusionPipeline:
    """A random-init pipeline of these part configs (built on the current default device: ``meta`` for none)."""
    # Drop SD's stored "float16": built in fp32, and saved in fp32 so a reload stays fp32.
    text_config = CLIPTextConfig.from_dict({k: v for k, v in configs["text_encoder"].items() if k != "torch_dtype"})
    return make_pipeline(AutoencoderKL.from_config(configs["vae"]), CLIPTextModel(text_config), tokenizer,
                         UNet2DConditionModel.from_config(configs["unet"]),
                         PNDMScheduler.from_config(configs["scheduler"]))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, exactly as StableDiffusionPipeline tokenizes."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------- schedulers
def fast_scheduler(scheduler_config) -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) from any SD scheduler config; a cosine schedule needs lambda_min_clipped."""
    extra = {"lambda_min_clipped": -5.1} if scheduler_config.get("beta_schedule") == "squaredcos_cap_v2" else {}
    return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++",
                                                   solver_order=2, timestep_spacing="trailing", **extra)


def sampler_scheduler(sampler: Sampler, scheduler_config):
    """paper: DDPM on the model's own schedule (the official default); fast: DPM-Solver++(2M)."""
    if sampler == "paper":
        return DDPMScheduler.from_config(scheduler_config)
    if sampler == "fast":
        return fast_scheduler(scheduler_config)
    raise ValueError(f"sampler must be 'paper' or 'fast', got {sampler!r}")


def sampler_steps(sampler: Sampler, steps: int | None = None) -> int:
    """``steps``, or the sampler's own count (``vlv.config.DEFAULT_STEPS``: fast 20, paper 50)."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"sampler must be 'paper' or 'fast', got {sampler!r}")
    return steps or DEFAULT_STEPS[sampler]


def with_sampler(pipe: StableDiffusionPipeline, sampler: Sampler) -> StableDiffusionPipeline:
    """The stock pipeline over the same components with the sampler's scheduler, progress bar off."""
    out = make_pipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet,
                        sampler_scheduler(sampler, pipe.scheduler.config))
    out.set_progress_bar_config(disable=True)
    return out


# ---------------------------------------------------------------------------------------------- draws
class RandomDraws(Protocol):
    """Where a loss's random draws come from, per sample: the three calls the core makes. Training passes its
    per-sample draws over the global batch (``vlv.training.draws.Draws``); anything else a plain generator."""

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor: ...

    def randint(self, low: int, high: int, b: int, device: torch.device | str) -> torch.Tensor: ...

    def rand(self, b: int, device: torch.device | str) -> torch.Tensor: ...


@dataclass(frozen=True)
class GeneratorDraws:
    """A plain generator (None: the global RNG) drawing for its own batch alone."""

    generator: torch.Generator | None = None

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=device, dtype=dtype)

    def randint(self, low: int, high: int, b: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(low, high, (b,), generator=self.generator, device=device)

    def rand(self, b: int, device: torch.device | str) -> torch.Tensor:
        return torch.rand(b, generator=self.generator, device=device)


Random = torch.Generator | RandomDraws | None


def as_draws(random: Random) -> RandomDraws:
    """Draws as given, or a plain generator's (None: the global RNG's)."""
    return GeneratorDraws(random) if random is None or isinstance(random, torch.Generator) else random


def posterior_sample(posterior, random: Random = None) -> torch.Tensor:
    """diffusers' ``DiagonalGaussianDistribution.sample`` (mean + std * eps), its eps drawn per sample."""
    return posterior.mean + posterior.std * as_draws(random).randn(posterior.mean.shape, posterior.mean.device,
                                                                   posterior.mean.dtype)


# ---------------------------------------------------------------------------------------------- loss
def sample_timesteps(b: int, num_train: int, high_noise_fraction: float = 0.0,
                     generator: Random = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U{0..num_train-1}; with probability ``high_noise_fraction`` drawn from the upper half instead.

    Layout (how many objects, where) is decided at high noise, where the conditioning matters most; drawing
    those steps more often is a recipe setting. 0 = the paper's uniform sampling, the same random draws in the
    same order.
    """
    draws = as_draws(generator)
    t = draws.randint(0, num_train, b, device)
    if high_noise_fraction:
        high = draws.rand(b, device) < high_noise_fraction
        t = torch.where(high, draws.randint(num_train // 2, num_train, b, device), t)
    return t


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts, read from the scheduler's config (SD 2.1-base: epsilon; the shapes teacher: v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float,
                   generator: Random = None, shift_factor: float | None = None) -> torch.Tensor:
    """A draw from a cached VAE posterior, scaled (after subtracting the VAE's ``shift_factor``, SD3/FLUX):
    exactly what encoding the image online would give."""
    eps = as_draws(generator).randn(mean.shape, mean.device, mean.dtype)
    sample = mean + std * eps  # (B, C, h, w)
    return sample * scaling_factor if shift_factor is None else (sample - shift_factor) * scaling_factor


def diffusion_loss(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler,
                   latents: torch.Tensor, generator: Random = None,
                   high_noise_fraction: float = 0.0) -> torch.Tensor:
    """MSE between ``denoise(x_t, t)`` and the scheduler's target on scaled latents (B, C, h, w) (paper Eq. 2).

    ``denoise`` is the conditioned UNet: stage 1 conditions it on T(z), the teacher on T(caption ids).
    """
    b, device = latents.shape[0], latents.device
    t = sample_timesteps(b, scheduler.config.num_train_timesteps, high_noise_fraction, generator, device)  # (B,)
    noise = as_draws(generator).randn(latents.shape, device, latents.dtype)  # (B, C, h, w)
    noisy = scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
    target = diffusion_target(scheduler, latents, noise, t)  # (B, C, h, w)
    return F.mse_loss(denoise(noisy, t).float(), target.float())


def flow_matching_density(b: int, random: Random = None, weighting_scheme: str = "logit_normal",
                          logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """u in [0, 1] per sample: ``diffusers.training_utils.compute_density_for_timestep_sampling``'s formulas.

    Restated here because diffusers' function draws from a torch.Generator only; vlv's draws (``RandomDraws``)
    make a resumed or N-process run draw what one process would. logit_normal: sigmoid(mean + std * randn);
    mode: 1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u) on u ~ U[0, 1); anything else: U[0, 1).
    """
    draws = as_draws(random)
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * draws.randn((b,), device))
    u = draws.rand(b, device)
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_matching_loss(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler,
                       latents: torch.Tensor, random: Random = None, weighting_scheme: str = "logit_normal",
                       logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                       high_noise_fraction: float = 0.0) -> torch.Tensor:
    """The rectified-flow loss of SD3/FLUX-class models, as diffusers' ``train_dreambooth_sd3.py`` computes it.

    u from :func:`flow_matching_density`, index = floor(u * N) into the training schedule of a
    ``FlowMatchEulerDiscreteScheduler`` (its shift applied; never ``set_timesteps``'d), noisy = (1 - s) x0 + s eps,
    target eps - x0, weighted by ``compute_loss_weighting_for_sd3``; per-sample mean, then the batch mean.
    ``denoise(noisy, timesteps)`` is the conditioned model's prediction, timesteps on the scheduler's scale.
    ``high_noise_fraction``: as :func:`sample_timesteps`, that share of the batch draws its index uniformly from the
    noisier half of the schedule instead (index 0 is the noisiest); 0 = diffusers, the same draws.
    Draws: u first (then the high-noise ones), then the noise (the order of :func:`diffusion_loss`).
    """
    num_train = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != num_train:
        raise ValueError("flow_matching_loss needs the training schedule: pass a scheduler never set_timesteps'd")
    b, device = latents.shape[0], latents.device
    u = flow_matching_density(b, random, weighting_scheme, logit_mean, logit_std, mode_scale, device)  # (B,)
    if high_noise_fraction:
        draws = as_draws(random)
        high = draws.rand(b, device) < high_noise_fraction
        u = torch.where(high, 0.5 * draws.rand(b, device), u)  # indices in [0, N/2): sigma above the midpoint's
    # u can reach 1.0 ("mode" at u=0, sigmoid rounding): diffusers would index past the end; clamp to the last step.
    indices = (u * num_train).long().clamp(0, num_train - 1).cpu()  # (B,)
    timesteps = scheduler.timesteps[indices].to(device)  # (B,)
    sigmas = scheduler.sigmas[indices].to(device=device, dtype=latents.dtype).view(b, *[1] * (latents.ndim - 1))
    noise = as_draws(random).randn(latents.shape, device, latents.dtype)  # (B, C, h, w)
    noisy = (1.0 - sigmas) * latents + sigmas * noise  # (B, C, h, w)
    target = noise - latents  # (B, C, h, w)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).float()  # (B, 1, 1, 1)
    err = weighting * (denoise(noisy, timesteps).float() - target.float()) ** 2  # (B, C, h, w)
    return err.reshape(b, -1).mean(1).mean()


# ------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def draw(pipe: DiffusionPipeline, captions: list[str], guidance_scale: float, steps: int, seed: int = 0,
         batch_size: int = 256) -> list[Image.Image]:
    """Text-to-image through any stock pipeline as it is (its scheduler), batched; each chunk seeded by its offset,
    so batching is invisible."""
    images = []
    for start in range(0, len(captions), batch_size):
        gen = torch.Generator(pipe.device).manual_seed(seed + start)
        out = pipe(prompt=captions[start : start + batch_size], num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=gen, output_type="pt")
        images += to_pil(out.images * 2 - 1)
    return images


def sample(pipe: StableDiffusionPipeline, captions: list[str], guidance_scale: float = DEFAULT_GUIDANCE,
           steps: int | None = None, sampler: Sampler = "fast", seed: int = 0,
           batch_size: int = 256) -> list[Image.Image]:
    """:func:`draw` through an SD 2.x pipeline with the sampler's scheduler; ``steps`` None: the sampler's own."""
    return draw(with_sampler(pipe, sampler), captions, guidance_scale, sampler_steps(sampler, steps), seed, batch_size)
