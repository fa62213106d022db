"""The frozen diffusion decoder: caption embeddings z -> T(z) -> UNet/VAE (stage-1 loss, reconstruction).

Paper Sec. 3.1 (``docs/method.md`` "Stage 1" step 5, "Reconstruction" and "Composition"): the UNet is
conditioned on c = T(z) (``vlv.text_encoder``) and trained against by ``vlv.diffusion.diffusion_loss``. The
wrapped pipeline is any Stable-Diffusion-layout dir (the shapes teacher or SD 2.1-base); every part of it is
frozen, and gradients flow through T and the UNet into z. Reconstruction is the stock
``StableDiffusionPipeline`` called with ``prompt_embeds`` / ``negative_prompt_embeds``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torch import nn

from vlv.diffusion import (
    DEFAULT_GUIDANCE,
    Random,
    Sampler,
    diffusion_loss,
    load_pipeline,
    make_pipeline,
    posterior_sample,
    sampler_steps,
    with_sampler,
)
from vlv.shipped import resolve_decoder
from vlv.text_encoder import clip_from_embeds


class DiffusionDecoder(nn.Module):
    """A frozen T2I model used as a decoder of caption embeddings z (B, Nq, d_T)."""

    def __init__(self, pipe: StableDiffusionPipeline):
        super().__init__()
        self.vae, self.text_encoder, self.unet = pipe.vae, pipe.text_encoder, pipe.unet
        self.tokenizer = pipe.tokenizer
        # Training noise and paper sampling use DDPM on the pipeline's own schedule (as the official code does).
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> DiffusionDecoder:
        """Any Stable-Diffusion-layout dir or a shipped name (``shapes-teacher``), in ``dtype`` on ``device``;
        FileNotFoundError otherwise."""
        return cls(load_pipeline(resolve_decoder(path), device=device, dtype=dtype))

    def train(self, mode: bool = True) -> DiffusionDecoder:
        """Always eval: the decoder is frozen, whatever mode the surrounding model is put in."""
        return super().train(False)

    @property
    def text_dim(self) -> int:
        """d_T: the width z must have (the text encoder's token-embedding width)."""
        return self.text_encoder.config.hidden_size

    @property
    def image_size(self) -> int:
        """The resolution the UNet was trained at: latent sample_size times the VAE's downsampling."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -------------------------------------------------------------------------------- T(z)
    def encode_text_embeds(self, z: torch.Tensor) -> torch.Tensor:
        """c = T(inputs_embeds=z), z (B, L, d_T) -> (B, L, d_T); see :func:`vlv.text_encoder.clip_from_embeds`."""
        return clip_from_embeds(self.text_encoder, z)

    def unconditional_embeds(self, length: int) -> torch.Tensor:
        """T(tokenizer("")) padded to the tokenizer's length, first ``length`` positions: (1, length, d_T)."""
        max_length = max(length, self.tokenizer.model_max_length)
        ids = self.tokenizer([""], padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.text_encoder.device)  # (1, max_length)
        return self.text_encoder(ids).last_hidden_state[:, :length]  # (1, length, d_T)

    # -------------------------------------------------------------------------------- loss
    def latents(self, images: torch.Tensor, generator: Random = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> VAE latents (B, C, h, w) sampled from the posterior, scaled."""
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
        return posterior_sample(posterior, generator) * self.vae.config.scaling_factor  # (B, C, h, w)

    def loss(self, latents_or_images: torch.Tensor, z: torch.Tensor,
             generator: Random = None, high_noise_fraction: float = 0.0) -> torch.Tensor:
        """The stage-1 loss (paper Eq. 2): :func:`vlv.diffusion.diffusion_loss` of the frozen UNet given T(z).

        ``latents_or_images`` is told apart by its channels: the VAE's in_channels (images in [-1, 1]) or its
        latent_channels (latents already scaled by ``scaling_factor``, e.g. cached). ``high_noise_fraction``
        > 0 over-samples t in the upper half (:func:`vlv.diffusion.sample_timesteps`); 0 is the paper.
        """
        x = latents_or_images
        latents = x if self._is_latents(x) else self.latents(x, generator)  # (B, C, h, w)
        c = self.encode_text_embeds(z)  # (B, Nq, d_T)
        return diffusion_loss(lambda noisy, t: self.unet(noisy, t, encoder_hidden_states=c).sample, self.scheduler,
                              latents, generator, high_noise_fraction)

    def _is_latents(self, x: torch.Tensor) -> bool:
        image_c, latent_c = self.vae.config.in_channels, self.vae.config.latent_channels
        if image_c == latent_c:
            raise ValueError("the VAE's image and latent channel counts are equal: pass latents via latents()")
        if x.shape[1] not in (image_c, latent_c):
            raise ValueError(f"expected {image_c} (images) or {latent_c} (latents) channels, got {x.shape[1]}")
        return x.shape[1] == latent_c

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, sampler: Sampler = "paper") -> StableDiffusionPipeline:
        """The stock pipeline over the frozen parts with the sampler's scheduler."""
        return with_sampler(make_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler),
                            sampler)

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor, guidance_scale: float = DEFAULT_GUIDANCE, steps: int | None = None,
                    sampler: Sampler = "paper", generator: torch.Generator | None = None,
                    output_type: str = "pt", **pipeline_kwargs):
        """Caption-free generation from z (B, L, d_T) with CFG against T("") over the same L positions.

        paper: DDPM, 50 steps, g = 2.0 (official defaults); fast: DPM-Solver++(2M), 20 steps.
        Returns the pipeline's images (``output_type`` "pt": (B, 3, H, W) in [0, 1]). ``pipeline_kwargs`` go to
        the stock pipeline as they are (``latents``, ``callback_on_step_end``, ...).
        """
        pipe = self.pipeline(sampler)
        cond = self.encode_text_embeds(z)  # (B, L, d_T)
        uncond = self.unconditional_embeds(z.shape[1]).expand_as(cond)  # (B, L, d_T)
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=guidance_scale,
                    num_inference_steps=sampler_steps(sampler, steps), generator=generator,
                    output_type=output_type, **pipeline_kwargs).images


def compose(z_a: torch.Tensor, z_b: torch.Tensor, k: int) -> torch.Tensor:
    """Paper Fig. 6: the first k embeddings of each image, concatenated: (B, Nq, d_T) x 2 -> (B, 2k, d_T)."""
    if not 0 < k <= min(z_a.shape[1], z_b.shape[1]):
        raise ValueError(f"k must be in 1..{min(z_a.shape[1], z_b.shape[1])}, got {k}")
    return torch.cat([z_a[:, :k], z_b[:, :k]], dim=1)  # (B, 2k, d_T)

