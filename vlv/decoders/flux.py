"""FLUX.1 (``FluxPipeline``): CLIP-L (pooled only) + T5, a transformer on 2x2-packed latents, flow matching.

How z maps onto T (``vlv.text_encoder.CLIPAndT5``): z is d_clip + d_t5 wide (768 + 4096 = 4864 for FLUX.1); its
first d_clip channels go through CLIP-L as inputs_embeds, the rest through T5 as inputs_embeds. Then what the
stock ``encode_prompt`` builds from token ids:

- ``prompt_embeds``: T5's last hidden state, (B, L, d_t5); ``txt_ids`` zeros (L, 3).
- ``pooled_prompt_embeds``: CLIP's final-LayerNormed state at z's last position (its ``pooler_output`` reads the
  EOS token; z has none), (B, d_clip).
- unconditional: the stock encoding of "" with T5 over z's L positions (``max_sequence_length`` L: T5 attends both
  ways, so its states cannot be cut to L after the fact).
- guidance: real classifier-free guidance at vlv's scale (the stock ``true_cfg_scale``, against the negative
  branch). A guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) also gets its embedded guidance,
  ``embedded_guidance`` (3.5, the stock default), in training and sampling alike; FLUX.1-schnell has none.
- loss: :func:`vlv.diffusion.flow_matching_loss` on ``(sample - shift_factor) * scaling_factor`` latents, packed
  2x2 (``FluxPipeline._pack_latents``) for the transformer with image ids, timestep / 1000, and unpacked again;
  uniform timestep density, as diffusers' FLUX training scripts default to.
- reconstruction: the stock pipeline on a fresh copy of the model's flow-matching Euler scheduler (its dynamic
  shift from the image size), for both samplers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from vlv.decoder import DiffusionDecoder
from vlv.decoders import FLUX
from vlv.diffusion import Random, Sampler, flow_matching_loss
from vlv.progress import quiet_library
from vlv.text_encoder import CLIPAndT5

EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, and diffusers' FLUX training scripts'


class FluxDecoder(DiffusionDecoder):
    """A FluxPipeline's frozen parts as a decoder of z (B, Nq, d_clip + d_t5)."""

    family = FLUX

    def __init__(self, pipe: FluxPipeline, weighting_scheme: str = "none",
                 embedded_guidance: float = EMBEDDED_GUIDANCE):
        super().__init__()
        self.vae, self.transformer = pipe.vae, pipe.transformer
        self.text_encoder = CLIPAndT5(pipe.text_encoder, pipe.text_encoder_2)
        self.tokenizer, self.tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # never set_timesteps'd
        self.weighting_scheme, self.embedded_guidance = weighting_scheme, embedded_guidance
        config = self.transformer.config
        clip_width, t5_width = self.text_encoder.widths
        if (config.pooled_projection_dim, config.joint_attention_dim) != (clip_width, t5_width):
            raise ValueError(f"the transformer takes pooled {config.pooled_projection_dim} and sequence "
                             f"{config.joint_attention_dim} wide; CLIP and T5 give {clip_width} and {t5_width}")
        if config.in_channels != 4 * self.vae.config.latent_channels:
            raise ValueError(f"the transformer takes {config.in_channels} channels, not the VAE's "
                             f"{self.vae.config.latent_channels} packed 2x2")
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> FluxDecoder:
        with quiet_library():
            pipe = FluxPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        return cls(pipe).to(device)

    @classmethod
    def build(cls, configs: dict[str, dict], tokenizer=None) -> FluxDecoder:
        def fields(name: str) -> dict:
            return {k: v for k, v in configs[name].items() if k != "torch_dtype"}

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
                            vae=AutoencoderKL.from_config(configs["vae"]),
                            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(fields("text_encoder"))),
                            tokenizer=tokenizer,
                            text_encoder_2=T5EncoderModel(T5Config.from_dict(fields("text_encoder_2"))),
                            tokenizer_2=tokenizer,
                            transformer=FluxTransformer2DModel.from_config(configs["transformer"]))
        return cls(pipe)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The stock pipeline's default resolution (its transformer config names none): 128 latents a side."""
        return 128 * self.vae_scale_factor

    # -------------------------------------------------------------------------------- T(z)
    def conditioning(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pooled, t5 = self.text_encoder.states(z)
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled}  # (B, L, d_t5), (B, d_clip)

    def unconditional(self, length: int) -> dict[str, torch.Tensor]:
        """The stock encoding of "" with T5 over ``length`` positions."""
        embeds, pooled, _ = self.pipeline().encode_prompt(prompt="", device=self.device, max_sequence_length=length)
        return {"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled}

    def guidance(self, guidance_scale: float) -> dict[str, float]:
        """Real CFG at vlv's scale; the embedded guidance of a distilled model stays its own."""
        return {"true_cfg_scale": guidance_scale, "guidance_scale": self.embedded_guidance}

    # -------------------------------------------------------------------------------- loss
    def denoising_loss(self, latents: torch.Tensor, z: torch.Tensor, generator: Random = None,
                       high_noise_fraction: float = 0.0) -> torch.Tensor:
        """:func:`vlv.diffusion.flow_matching_loss` of the frozen transformer on 2x2-packed latents given T(z)."""
        b, ch, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs latents 2x2: {h}x{w} latents are odd; give an image size that is a "
                             f"multiple of {2 * self.vae_scale_factor}")
        c = self.conditioning(z)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(z.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = (torch.full((b,), self.embedded_guidance, device=latents.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        scale = self.vae_scale_factor

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            packed = FluxPipeline._pack_latents(noisy, b, ch, h, w)  # (B, h/2 * w/2, 4C)
            out = self.transformer(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                                   pooled_projections=c["pooled_prompt_embeds"],
                                   encoder_hidden_states=c["prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids,
                                   return_dict=False)[0]
            return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)  # (B, C, h, w)

        return flow_matching_loss(denoise, self.scheduler, latents, generator, self.weighting_scheme,
                                  high_noise_fraction=high_noise_fraction)

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, sampler: Sampler = "paper") -> FluxPipeline:
        """The stock pipeline on a fresh copy of the model's flow-matching Euler scheduler (either sampler)."""
        if sampler not in ("paper", "fast"):
            raise ValueError(f"sampler must be 'paper' or 'fast', got {sampler!r}")
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
                            vae=self.vae, text_encoder=self.text_encoder.clip, tokenizer=self.tokenizer,
                            text_encoder_2=self.text_encoder.t5, tokenizer_2=self.tokenizer_2,
                            transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe
