"""SD 3 / 3.5 (``StableDiffusion3Pipeline``): CLIP-L + CLIP-G (+ T5), an MMDiT transformer, flow matching.

How z maps onto the two CLIPs (``vlv.text_encoder.CLIPStack``): z is d_1 + d_2 wide (768 + 1280 = 2048 for
SD 3.5); its first d_1 channels go to CLIP 1 and the rest to CLIP 2, each as inputs_embeds. Then exactly what the
stock ``encode_prompt`` builds from token ids:

- ``prompt_embeds``: each CLIP's penultimate hidden states (clip_skip None), concatenated on the feature axis,
  zero-padded to the transformer's joint_attention_dim, then the T5 part on the sequence axis. z never goes
  through T5 (no T5 is loaded: 4.7 B parameters that z would not reach); the T5 part is zeros of
  ``max_sequence_length`` (256) positions, as the stock pipeline makes it with ``text_encoder_3=None``.
  Shape (B, L + 256, joint_attention_dim).
- ``pooled_prompt_embeds``: each CLIP's text_projection of its final-LayerNormed state at z's last position (z has
  no EOS token: the last position is the one that has attended to all of z), concatenated: (B, p_1 + p_2).
- unconditional: the stock encoding of "" (the pipeline's negative prompt) with the same zero T5 part, its CLIP
  part cut to z's L positions (CLIP is causal: the first L positions do not see the rest).
- loss: :func:`vlv.diffusion.flow_matching_loss` on ``(sample - shift_factor) * scaling_factor`` latents. The 256
  zero T5 positions are identical, so every layer maps them to identical states and every query weighs them
  alike: the loss keeps one and adds log(256) to its attention logit (:class:`KeyBiasJointAttnProcessor`), the
  same function on L + 1 context tokens instead of L + 256 (``collapse_t5``; off: the stock context). In bf16 or
  fp16 attention log(256) is not exact, so a second key carries the remainder (:func:`tail_biases`).
- reconstruction: the stock pipeline with the four embeddings; both samplers are its FlowMatchEuler scheduler
  (paper: 50 steps; fast: 20).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from vlv.decoder import DiffusionDecoder
from vlv.decoders import SD3
from vlv.diffusion import Random, Sampler, flow_matching_loss
from vlv.progress import quiet_library
from vlv.text_encoder import CLIPStack

T5_LENGTH = 256  # the stock pipeline's default max_sequence_length: the zero T5 part's positions


class KeyBiasJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' ``JointAttnProcessor2_0`` that applies ``attention_mask`` as an additive bias on the joint
    attention's logits (the stock one takes the argument and ignores it). Without a mask, or without context (the
    dual-attention layers' image-only ``attn2``, handed the same kwargs), it is the stock processor.

    Written out because no diffusers processor adds a bias to SD3's joint attention; the projections and norms
    are the stock processor's, in its order."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, None, *args, **kwargs)
        b, n_image = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # (B, H, N, d)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)  # image tokens, then context
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask.to(q.dtype))  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


def tail_biases(repeats: int, dtype: torch.dtype, tolerance: float = 1e-4) -> list[float]:
    """Logit biases b_i, each exact in ``dtype``, with sum exp(b_i) = ``repeats`` within ``tolerance`` (relative):
    the softmax weight of ``repeats`` identical keys carried by len(b) keys. fp32 needs one (log 256); bf16 rounds
    log 256 to 5.53125, 252.5 keys' weight, so a second key carries the rest."""
    biases, left = [], float(repeats)
    while left > tolerance * repeats and len(biases) < 4:
        b = torch.tensor(math.log(left), dtype=torch.float64).to(dtype)
        if math.exp(float(b)) - left > tolerance * repeats:  # overshoots: round down, what is left stays > 0
            b = torch.nextafter(b, torch.tensor(-math.inf, dtype=dtype))
        biases.append(float(b))
        left -= math.exp(float(b))
    return biases


def repeated_tail_bias(n_keys: int, biases: list[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit bias (1, 1, 1, n_keys): the last len(biases) keys get :func:`tail_biases`' values (softmax weights
    exp(s) x repeats = exp(s + log repeats)), the others 0."""
    bias = torch.zeros(1, 1, 1, n_keys, device=device)
    for i, b in enumerate(biases, start=n_keys - len(biases)):
        bias[..., i] = b  # a scalar fill: no host-to-device copy, so no stream sync per step
    return bias


def make_sd3_pipeline(decoder: SD3Decoder, scheduler) -> StableDiffusion3Pipeline:
    clip_1, clip_2 = decoder.text_encoder.encoders
    pipe = StableDiffusion3Pipeline(transformer=decoder.transformer, scheduler=scheduler, vae=decoder.vae,
                                    text_encoder=clip_1, tokenizer=decoder.tokenizer, text_encoder_2=clip_2,
                                    tokenizer_2=decoder.tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)  # vlv draws one bar per job, not per batch
    return pipe


class SD3Decoder(DiffusionDecoder):
    """A StableDiffusion3Pipeline's frozen parts (T5 left out) as a decoder of z (B, Nq, d_1 + d_2)."""

    family = SD3

    def __init__(self, pipe: StableDiffusion3Pipeline, weighting_scheme: str = "logit_normal",
                 collapse_t5: bool = True):
        super().__init__()
        self.vae, self.transformer = pipe.vae, pipe.transformer
        self.text_encoder = CLIPStack([pipe.text_encoder, pipe.text_encoder_2])
        self.tokenizer, self.tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
        # The training schedule: never set_timesteps'd (sampling builds its own scheduler from this config).
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.weighting_scheme = weighting_scheme  # diffusers' SD3 training default
        self.collapse_t5 = collapse_t5
        if collapse_t5:  # stock without a mask: the pipeline's sampling is unchanged
            self.transformer.set_attn_processor(KeyBiasJointAttnProcessor())
        joint, pooled = self.transformer.config.joint_attention_dim, self.transformer.config.pooled_projection_dim
        if self.text_dim > joint:
            raise ValueError(f"the CLIPs are {self.text_dim} wide together, more than the transformer's "
                             f"joint_attention_dim {joint}")
        projected = sum(e.config.projection_dim for e in self.text_encoder.encoders)
        if projected != pooled:
            raise ValueError(f"the CLIPs pool to {projected}, the transformer takes {pooled}")
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> SD3Decoder:
        """The dir's parts but T5 (``text_encoder_3=None``: z never reaches it), in ``dtype`` on ``device``."""
        with quiet_library():
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, text_encoder_3=None, tokenizer_3=None,
                                                            local_files_only=True)
        return cls(pipe).to(device)

    @classmethod
    def build(cls, configs: dict[str, dict], tokenizer=None) -> SD3Decoder:
        def clip(config: dict) -> CLIPTextModelWithProjection:
            return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(
                {k: v for k, v in config.items() if k != "torch_dtype"}))

        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel.from_config(configs["transformer"]),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
            vae=AutoencoderKL.from_config(configs["vae"]), text_encoder=clip(configs["text_encoder"]),
            tokenizer=tokenizer, text_encoder_2=clip(configs["text_encoder_2"]), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
        return cls(pipe)

    # -------------------------------------------------------------------------------- T(z)
    def _embeds(self, clip: torch.Tensor, pooled: list[torch.Tensor],
                t5_positions: int = T5_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """As the stock encode_prompt: pad the CLIP part to joint_attention_dim, append the zero T5 part."""
        joint = self.transformer.config.joint_attention_dim
        clip = F.pad(clip, (0, joint - clip.shape[-1]))  # (B, L, joint)
        t5 = clip.new_zeros(clip.shape[0], t5_positions, joint)  # (B, 256, joint)
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)  # (B, L + 256, joint), (B, p_1 + p_2)

    def conditioning(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds, pooled = self._embeds(*self.text_encoder.states(z))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def unconditional(self, length: int) -> dict[str, torch.Tensor]:
        """The stock pipeline's encoding of "" (zero T5 part), its CLIP part cut to ``length`` positions."""
        embeds, _, pooled, _ = self.pipeline().encode_prompt(
            prompt="", prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=T5_LENGTH)  # (1, 77 + 256, joint), (1, p_1 + p_2)
        positions = embeds.shape[1] - T5_LENGTH
        if length > positions:
            raise ValueError(f"z has {length} positions; the tokenizer pads \"\" to {positions}")
        embeds = torch.cat([embeds[:, :length], embeds[:, positions:]], dim=1)  # (1, L + 256, joint)
        return {"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled}

    # -------------------------------------------------------------------------------- loss
    def denoising_loss(self, latents: torch.Tensor, z: torch.Tensor, generator: Random = None,
                       high_noise_fraction: float = 0.0) -> torch.Tensor:
        """:func:`vlv.diffusion.flow_matching_loss` of the frozen transformer given T(z) (the T5 part collapsed to
        one key counted 256 times when ``collapse_t5``: see the module doc)."""
        tail = tail_biases(T5_LENGTH, self._attention_dtype(latents.device)) if self.collapse_t5 else []
        embeds, pooled = self._embeds(*self.text_encoder.states(z), t5_positions=len(tail) or T5_LENGTH)
        patch = self.transformer.config.patch_size

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = None
            if tail:
                keys = (noisy.shape[-2] // patch) * (noisy.shape[-1] // patch) + embeds.shape[1]  # image, context
                kwargs = {"attention_mask": repeated_tail_bias(keys, tail, noisy.device)}
            return self.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, joint_attention_kwargs=kwargs, return_dict=False)[0]

        return flow_matching_loss(denoise, self.scheduler, latents, generator, self.weighting_scheme,
                                  high_noise_fraction=high_noise_fraction)

    def _attention_dtype(self, device: torch.device) -> torch.dtype:
        """What the attention logits are computed in: autocast's dtype when it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.transformer.dtype

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, sampler: Sampler = "paper") -> StableDiffusion3Pipeline:
        """The stock pipeline on a fresh copy of the model's own FlowMatchEuler scheduler (either sampler)."""
        if sampler not in ("paper", "fast"):
            raise ValueError(f"sampler must be 'paper' or 'fast', got {sampler!r}")
        return make_sd3_pipeline(self, FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config))
