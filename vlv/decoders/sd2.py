"""SD 2.x (the paper's decoder, and the shapes teacher): one CLIP T, a UNet, eps/v on a DDPM schedule.

T(z) = CLIP(inputs_embeds=z): last hidden state after the final LayerNorm, (B, L, d_T) (``docs/method.md`` Stage 1
step 5). Unconditional: T(tokenizer("")) padded to the tokenizer's length, its first L positions. Loss:
:func:`vlv.diffusion.diffusion_loss`, t ~ U{0..999}. Reconstruction: the stock ``StableDiffusionPipeline``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from vlv.decoder import DiffusionDecoder
from vlv.decoders import SD2
from vlv.diffusion import (
    Random,
    Sampler,
    diffusion_loss,
    load_pipeline,
    make_pipeline,
    pipeline_from_configs,
    with_sampler,
)
from vlv.text_encoder import clip_from_embeds


class SD2Decoder(DiffusionDecoder):
    """A Stable-Diffusion-layout T2I model (SD 2.1-base, the shapes teacher) as a decoder of z (B, Nq, d_T)."""

    family = SD2

    def __init__(self, pipe: StableDiffusionPipeline):
        super().__init__()
        self.vae, self.text_encoder, self.unet = pipe.vae, pipe.text_encoder, pipe.unet
        self.tokenizer = pipe.tokenizer
        # Training noise and paper sampling use DDPM on the pipeline's own schedule (as the official code does).
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> SD2Decoder:
        return cls(load_pipeline(path, device=device, dtype=dtype))

    @classmethod
    def build(cls, configs: dict[str, dict], tokenizer=None) -> SD2Decoder:
        return cls(pipeline_from_configs(configs, tokenizer))

    @property
    def text_dim(self) -> int:
        """d_T: the width z must have (the text encoder's token-embedding width)."""
        return self.text_encoder.config.hidden_size

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

    def conditioning(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.encode_text_embeds(z)}  # (B, L, d_T)

    def unconditional(self, length: int) -> dict[str, torch.Tensor]:
        return {"negative_prompt_embeds": self.unconditional_embeds(length)}  # (1, L, d_T)

    # -------------------------------------------------------------------------------- loss
    def denoising_loss(self, latents: torch.Tensor, z: torch.Tensor, generator: Random = None,
                       high_noise_fraction: float = 0.0) -> torch.Tensor:
        """:func:`vlv.diffusion.diffusion_loss` of the frozen UNet given T(z)."""
        c = self.encode_text_embeds(z)  # (B, Nq, d_T)
        return diffusion_loss(lambda noisy, t: self.unet(noisy, t, encoder_hidden_states=c).sample, self.scheduler,
                              latents, generator, high_noise_fraction)

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, sampler: Sampler = "paper") -> StableDiffusionPipeline:
        """paper: DDPM on the model's own schedule, 50 steps; fast: DPM-Solver++(2M), 20 steps."""
        return with_sampler(make_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler),
                            sampler)
