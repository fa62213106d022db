"""The frozen diffusion decoder: caption embeddings z -> T(z) -> denoiser/VAE (stage-1 loss, reconstruction).

Paper Sec. 3.1 (``docs/method.md`` "Stage 1" step 5, "Reconstruction" and "Composition"): the denoiser is
conditioned on T(z), T the model's own frozen text encoder(s) fed z as inputs_embeds; every part is frozen, and
gradients flow through T and the denoiser into z. Reconstruction is the model's stock diffusers pipeline called
with the embeddings (``prompt_embeds``, ``pooled_prompt_embeds`` and the negative ones).

:class:`DiffusionDecoder` is the one interface; what differs between families (what T(z) yields, the
unconditional branch, the loss, the latent scaling, the pipeline) lives in one subclass per family
(``vlv.decoders``): SD 2.x (:class:`vlv.decoders.sd2.SD2Decoder`, the paper's), SD3 (``sd3.SD3Decoder``), SDXL
(``sdxl.SDXLDecoder``) and FLUX.1 (``flux.FluxDecoder``). ``DiffusionDecoder.from_pretrained(dir)`` and
``DiffusionDecoder(pipe)`` pick the family from the dir's ``model_index.json`` / the pipeline's class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vlv.decoders import Family, family_named, family_of
from vlv.diffusion import DEFAULT_GUIDANCE, Random, Sampler, draw, posterior_sample, sample_latents, sampler_steps
from vlv.shipped import resolve_decoder


class DiffusionDecoder(nn.Module):
    """A frozen T2I model used as a decoder of caption embeddings z (B, Nq, d_T).

    A subclass sets ``family`` and holds ``vae``, ``scheduler`` (the training schedule, never set_timesteps'd),
    ``text_encoder`` (T) and its denoiser (``denoiser``: ``unet`` or ``transformer``).
    """

    family: Family
    vae: nn.Module
    text_encoder: nn.Module

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> DiffusionDecoder:
        """Any diffusers dir of a family vlv takes (its model_index.json decides) or a shipped name
        (``shapes-teacher``), in ``dtype`` on ``device``; FileNotFoundError for no such dir."""
        path = resolve_decoder(path)
        klass = family_of(path).decoder_class()
        if not issubclass(klass, cls):
            raise ValueError(f"{path} holds a {klass.__name__}, not a {cls.__name__}")
        return klass.load(path, dtype=dtype, device=device)

    def __new__(cls, *args, **kwargs):
        """``DiffusionDecoder(pipe)``: the family's decoder over a built diffusers pipeline's parts (the pipeline's
        class decides the family), so callers need not know the families."""
        if cls is DiffusionDecoder:
            pipe = args[0] if args else kwargs["pipe"]
            cls = family_named(type(pipe).__name__).decoder_class()
        return super().__new__(cls)

    @classmethod
    def from_configs(cls, configs: dict[str, dict], tokenizer=None) -> DiffusionDecoder:
        """A random-init decoder of these part configs (``vlv.diffusion.pipeline_configs``), built on the current
        default device (``meta`` for a plan); ``configs["model_index"]`` names the family (none: SD 2.x)."""
        pipeline = configs.get("model_index", {}).get("_class_name", "StableDiffusionPipeline")
        return family_named(pipeline).decoder_class().build(configs, tokenizer)

    def train(self, mode: bool = True) -> DiffusionDecoder:
        """Always eval: the decoder is frozen, whatever mode the surrounding model is put in."""
        return super().train(False)

    # ------------------------------------------------------------------------------- per family
    @classmethod
    def load(cls, path: Path, dtype: torch.dtype, device: str | torch.device) -> DiffusionDecoder:
        raise NotImplementedError

    @classmethod
    def build(cls, configs: dict[str, dict], tokenizer=None) -> DiffusionDecoder:
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer: the attribute the family's table names."""
        return getattr(self, self.family.denoiser)

    @property
    def text_dim(self) -> int:
        """d_T: the width z must have; here T is a stack of ``vlv.text_encoder`` (the families with two text
        encoders: their widths summed, z split between them)."""
        return self.text_encoder.hidden_size

    def encode_text_embeds(self, z: torch.Tensor) -> torch.Tensor:
        """c = T(z) (B, L, d_T): the text encoder(s)' sequence output, what stage 2 reads (a stack's: its
        encoders' states side by side)."""
        return self.text_encoder(z)

    def conditioning(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the stock pipeline takes for z: ``prompt_embeds`` (and ``pooled_prompt_embeds``)."""
        raise NotImplementedError

    def unconditional(self, length: int) -> dict[str, torch.Tensor]:
        """The negative branch for z of ``length`` positions, batch 1: ``negative_prompt_embeds`` (...)."""
        raise NotImplementedError

    def denoising_loss(self, latents: torch.Tensor, z: torch.Tensor, generator: Random = None,
                       high_noise_fraction: float = 0.0) -> torch.Tensor:
        """The family's training loss of the frozen denoiser given T(z), on scaled latents."""
        raise NotImplementedError

    def pipeline(self, sampler: Sampler = "paper"):
        """The stock pipeline over the frozen parts with the sampler's scheduler."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- shared
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def image_size(self) -> int:
        """The resolution the denoiser was trained at: latent sample_size times the VAE's downsampling."""
        return self.denoiser.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in backward (diffusers checkpoints whenever grad is on, in train or
        eval mode, so gradients still reach z through the frozen denoiser)."""
        self.denoiser.enable_gradient_checkpointing()

    @property
    def latent_scaling(self) -> tuple[float, float | None]:
        """(scaling_factor, shift_factor) of the VAE: latents = (sample - shift) * scaling (SD3/FLUX shift)."""
        return self.vae.config.scaling_factor, getattr(self.vae.config, "shift_factor", None)

    def latents(self, images: torch.Tensor, generator: Random = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> VAE latents (B, C, h, w) sampled from the posterior, scaled."""
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
        scaling, shift = self.latent_scaling
        sample = posterior_sample(posterior, generator)  # (B, C, h, w)
        return sample * scaling if shift is None else (sample - shift) * scaling

    def posterior_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: Random = None) -> torch.Tensor:
        """A draw from a cached posterior (unscaled mean, std), scaled: what :meth:`latents` gives online."""
        scaling, shift = self.latent_scaling
        return sample_latents(mean, std, scaling, generator, shift)

    def loss(self, latents_or_images: torch.Tensor, z: torch.Tensor,
             generator: Random = None, high_noise_fraction: float = 0.0) -> torch.Tensor:
        """The stage-1 loss (paper Eq. 2): the family's denoising loss of the frozen denoiser given T(z).

        ``latents_or_images`` is told apart by its channels: the VAE's in_channels (images in [-1, 1]) or its
        latent_channels (latents already scaled, e.g. cached). ``high_noise_fraction`` > 0 over-samples the noisier
        half of the schedule (:func:`vlv.diffusion.sample_timesteps`, ``flow_matching_loss``); 0 is the paper.
        """
        x = latents_or_images
        latents = x if self._is_latents(x) else self.latents(x, generator)  # (B, C, h, w)
        return self.denoising_loss(latents, z, generator, high_noise_fraction)

    def _is_latents(self, x: torch.Tensor) -> bool:
        image_c, latent_c = self.vae.config.in_channels, self.vae.config.latent_channels
        if image_c == latent_c:
            raise ValueError("the VAE's image and latent channel counts are equal: pass latents via latents()")
        if x.shape[1] not in (image_c, latent_c):
            raise ValueError(f"expected {image_c} (images) or {latent_c} (latents) channels, got {x.shape[1]}")
        return x.shape[1] == latent_c

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor, guidance_scale: float = DEFAULT_GUIDANCE, steps: int | None = None,
                    sampler: Sampler = "paper", generator: torch.Generator | None = None,
                    output_type: str = "pt", **pipeline_kwargs):
        """Caption-free generation from z (B, L, d_T) with CFG against the family's unconditional branch over the
        same L positions, through the stock pipeline.

        ``sampler``/``steps``: the family's (SD 2.x paper: DDPM, 50 steps; fast: DPM-Solver++(2M), 20 steps).
        Returns the pipeline's images (``output_type`` "pt": (B, 3, H, W) in [0, 1]). ``pipeline_kwargs`` go to
        the stock pipeline as they are (``latents``, ``callback_on_step_end``, ...).
        """
        pipe = self.pipeline(sampler)
        cond = self.conditioning(z)
        uncond = {k: v.expand(len(z), *v.shape[1:]) for k, v in self.unconditional(z.shape[1]).items()}
        return pipe(**cond, **uncond, **self.guidance(guidance_scale),
                    num_inference_steps=sampler_steps(sampler, steps), generator=generator, output_type=output_type,
                    **pipeline_kwargs).images

    def generate(self, captions: list[str], guidance_scale: float = DEFAULT_GUIDANCE, steps: int | None = None,
                 sampler: Sampler = "fast", seed: int = 0, batch_size: int = 256) -> list[Image.Image]:
        """The model as a text-to-image teacher: captions through the stock pipeline with the family's sampler
        (:func:`vlv.diffusion.draw`: batched, each chunk seeded by its offset)."""
        return draw(self.pipeline(sampler), captions, guidance_scale, sampler_steps(sampler, steps), seed, batch_size)

    def guidance(self, guidance_scale: float) -> dict[str, float]:
        """The stock pipeline's arguments for classifier-free guidance at this scale against the negative branch."""
        return {"guidance_scale": guidance_scale}


def compose(z_a: torch.Tensor, z_b: torch.Tensor, k: int) -> torch.Tensor:
    """Paper Fig. 6: the first k embeddings of each image, concatenated: (B, Nq, d_T) x 2 -> (B, 2k, d_T)."""
    if not 0 < k <= min(z_a.shape[1], z_b.shape[1]):
        raise ValueError(f"k must be in 1..{min(z_a.shape[1], z_b.shape[1])}, got {k}")
    return torch.cat([z_a[:, :k], z_b[:, :k]], dim=1)  # (B, 2k, d_T)
