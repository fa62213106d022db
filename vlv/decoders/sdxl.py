"""SDXL (``StableDiffusionXLPipeline``): CLIP-L + OpenCLIP-bigG, a UNet with added conditions, eps/v on DDPM.

z is d_1 + d_2 wide (768 + 1280 = 2048 for SDXL base), split along channels over the two CLIPs as inputs_embeds
(``vlv.text_encoder.CLIPStack``), then what the stock ``encode_prompt`` builds from token ids:

- ``prompt_embeds``: both CLIPs' penultimate hidden states side by side, (B, L, d_1 + d_2); also c for stage 2.
- ``pooled_prompt_embeds``: CLIP 2's text_projection of its final-LayerNormed state at z's last position (z has
  no EOS token), (B, p_2).
- ``add_time_ids`` (original size, crop, target size): the square image, no crop: (H, W, 0, 0, H, W).
- unconditional: the stock rule: zeros when the dir's ``force_zeros_for_empty_prompt`` (SDXL base), else "" padded
  to z's L positions through both CLIPs.
- loss: :func:`vlv.diffusion.diffusion_loss` (the scheduler's prediction type) of the UNet given those.
- reconstruction: the stock pipeline; paper: DDPM, fast: DPM-Solver++(2M), as for SD 2.x.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from vlv.decoder import DiffusionDecoder
from vlv.decoders import SDXL
from vlv.diffusion import Random, Sampler, diffusion_loss, sampler_scheduler
from vlv.progress import quiet_library
from vlv.text_encoder import CLIPStack, text_class


class SDXLDecoder(DiffusionDecoder):
    """A StableDiffusionXLPipeline's frozen parts as a decoder of z (B, Nq, d_1 + d_2)."""

    family = SDXL

    def __init__(self, pipe: StableDiffusionXLPipeline):
        super().__init__()
        if pipe.text_encoder is None:
            raise ValueError("an SDXL dir without its first text encoder (a refiner) is not a decoder of z")
        self.vae, self.unet = pipe.vae, pipe.unet
        self.text_encoder = CLIPStack([pipe.text_encoder, pipe.text_encoder_2])
        self.tokenizer, self.tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
        self.force_zeros_for_empty_prompt = bool(pipe.config.force_zeros_for_empty_prompt)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # training noise, as for SD 2.x
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> SDXLDecoder:
        with quiet_library():
            pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False,
                                                             local_files_only=True)
        return cls(pipe).to(device)

    @classmethod
    def build(cls, configs: dict[str, dict], tokenizer=None) -> SDXLDecoder:
        def clip(name: str):
            model, config = text_class(configs["model_index"], name)
            return model(config.from_dict({k: v for k, v in configs[name].items() if k != "torch_dtype"}))

        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL.from_config(configs["vae"]), text_encoder=clip("text_encoder"),
            text_encoder_2=clip("text_encoder_2"), tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=UNet2DConditionModel.from_config(configs["unet"]),
            scheduler=DDPMScheduler.from_config(configs["scheduler"]), add_watermarker=False,
            force_zeros_for_empty_prompt=configs["model_index"].get("force_zeros_for_empty_prompt", True))
        return cls(pipe)

    # -------------------------------------------------------------------------------- T(z)
    def conditioning(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        c, pooled = self.text_encoder.states(z)
        return {"prompt_embeds": c, "pooled_prompt_embeds": pooled[-1]}  # (B, L, d), (B, p_2)

    def unconditional(self, length: int) -> dict[str, torch.Tensor]:
        """The stock pipeline's negative branch for prompt embeddings of ``length`` positions."""
        dtype = next(self.unet.parameters()).dtype
        embeds = torch.zeros(1, length, self.text_dim, device=self.device, dtype=dtype)
        pooled = torch.zeros(1, self.text_encoder.encoders[-1].config.projection_dim, device=self.device, dtype=dtype)
        _, neg, _, neg_pooled = self.pipeline().encode_prompt(
            prompt=None, device=self.device, do_classifier_free_guidance=True, prompt_embeds=embeds,
            pooled_prompt_embeds=pooled)
        return {"negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """(H, W, 0, 0, H, W) of the square image these latents decode to: (B, 6)."""
        h, w = (s * 2 ** (len(self.vae.config.block_out_channels) - 1) for s in latents.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], device=latents.device, dtype=latents.dtype).expand(len(latents), 6)

    # -------------------------------------------------------------------------------- loss
    def denoising_loss(self, latents: torch.Tensor, z: torch.Tensor, generator: Random = None,
                       high_noise_fraction: float = 0.0) -> torch.Tensor:
        """:func:`vlv.diffusion.diffusion_loss` of the frozen UNet given T(z), the pooled vector and the time ids."""
        c = self.conditioning(z)
        added = {"text_embeds": c["pooled_prompt_embeds"], "time_ids": self.time_ids(latents)}
        return diffusion_loss(lambda noisy, t: self.unet(noisy, t, encoder_hidden_states=c["prompt_embeds"],
                                                         added_cond_kwargs=added).sample,
                              self.scheduler, latents, generator, high_noise_fraction)

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, sampler: Sampler = "paper") -> StableDiffusionXLPipeline:
        """paper: DDPM on the model's own schedule; fast: DPM-Solver++(2M) (as for SD 2.x)."""
        clip_1, clip_2 = self.text_encoder.encoders
        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=clip_1, text_encoder_2=clip_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=sampler_scheduler(sampler, self.scheduler.config),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
