"""T: the frozen text encoder of the text-to-image model, applied to caption embeddings z instead of token ids.

Paper Sec. 3.1-3.2: c = T(inputs_embeds=z), learned positions 0..Nq-1 added, causal CLIP encoder, final
LayerNorm: (B, Nq, d_T). Stage 1 conditions the frozen UNet on c (``vlv.decoder``); stage 2 feeds c to psi
(``vlv.captioner``). Stage 2 needs T alone, so it is loaded without the UNet and VAE. A model with several CLIPs
(SD3, SDXL) has a :class:`CLIPStack` for T, FLUX.1 a :class:`CLIPAndT5`: z's channels split among them, c their
states side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers.masking_utils import create_causal_mask

from vlv.decoders import family_of
from vlv.errors import InvalidInput
from vlv.progress import quiet_library


def clip_from_embeds(text_encoder: CLIPTextModel, z: torch.Tensor) -> torch.Tensor:
    """c = T(inputs_embeds=z), z (B, L, d_T) -> (B, L, d_T); L <= the text encoder's positions.

    transformers 5's ``CLIPTextModel.forward`` takes only input_ids, so this repeats its body with the
    model's own submodules and mask: equal to ``text_encoder(ids).last_hidden_state`` when
    ``z = token_embedding(ids)``.
    """
    te = text_encoder
    hidden = te.embeddings(inputs_embeds=z)  # (B, L, d_T): z + position_embedding(0..L-1)
    mask = create_causal_mask(config=te.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    hidden = te.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state  # (B, L, d_T)
    return te.final_layer_norm(hidden)  # (B, L, d_T)


def clip_penultimate_and_pooled(text_encoder: CLIPTextModelWithProjection | CLIPTextModel, z: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD3/SDXL pipelines take from a CLIP, given z as inputs_embeds: (penultimate hidden states (B, L, d),
    pooled (B, p)).

    As diffusers' ``_get_clip_prompt_embeds`` with clip_skip None: ``hidden_states[-2]`` (the input of the last
    layer, no final LayerNorm) and ``text_embeds`` (text_projection of the final-LayerNormed state at the EOS
    token; a CLIPTextModel without projection: that state itself, its ``pooler_output``). z has no EOS token; its
    last position is the one that has attended to all of z (CLIP is causal), so it is pooled. Equal to the stock
    outputs when z = token_embedding(ids) and ids end in EOS.
    """
    te = getattr(text_encoder, "text_model", text_encoder)
    hidden = te.embeddings(inputs_embeds=z)  # (B, L, d): z + position_embedding(0..L-1)
    mask = create_causal_mask(config=te.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    *first, last = te.encoder.layers
    for layer in first:
        hidden = layer(hidden, mask, is_causal=True)
    penultimate = hidden  # (B, L, d)
    final = te.final_layer_norm(last(hidden, mask, is_causal=True))  # (B, L, d)
    projection = getattr(text_encoder, "text_projection", torch.nn.Identity())
    return penultimate, projection(final[:, -1])  # (B, L, d), (B, p)


@dataclass(frozen=True)
class CLIPStackConfig:
    """What callers read of a T's config, for a stack of CLIPs: the width of z and c, and each CLIP's config."""

    hidden_size: int
    encoders: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "encoders": list(self.encoders)}


class CLIPStack(nn.Module):
    """T of a model with several CLIP text encoders (SD3: CLIP-L + CLIP-G): z's channels split among them in
    order, each part fed to its CLIP as inputs_embeds.

    ``forward`` gives c = the penultimate hidden states concatenated on the feature axis, (B, L, sum d_i): as wide
    as z, what the denoiser reads of T besides the pooled vectors, and what stage 2 reads. ``states`` also gives
    each CLIP's pooled vector.
    """

    def __init__(self, encoders: list[CLIPTextModelWithProjection | CLIPTextModel]):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.widths = [e.config.hidden_size for e in encoders]
        fields = ({k: v for k, v in e.config.to_dict().items() if not k.startswith("_")} for e in encoders)
        self.config = CLIPStackConfig(sum(self.widths), tuple(fields))  # "_": where it was read, not what it is

    @property
    def hidden_size(self) -> int:
        """The width z must have, and c has."""
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        """The most positions z may hold: the fewest of the CLIPs'."""
        return min(e.config.max_position_embeddings for e in self.encoders)

    def states(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """z (B, L, sum d_i) -> (c (B, L, sum d_i), [pooled_i (B, p_i)])."""
        if z.shape[-1] != self.hidden_size:
            raise ValueError(f"z is {z.shape[-1]} wide; these text encoders take {self.hidden_size} "
                             f"({' + '.join(map(str, self.widths))})")
        out = [clip_penultimate_and_pooled(e, part) for e, part in zip(self.encoders, z.split(self.widths, -1),
                                                                          strict=True)]
        return torch.cat([o[0] for o in out], dim=-1), [o[1] for o in out]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.states(z)[0]


class CLIPAndT5(nn.Module):
    """T of FLUX.1: CLIP-L + T5. z's first d_clip channels go through CLIP as inputs_embeds (the transformer reads
    only its pooled vector: the final-LayerNormed state at z's last position, z having no EOS token), the rest
    through T5 as inputs_embeds (its last hidden state is ``prompt_embeds``).

    ``forward`` gives c = the CLIP's final states and T5's side by side, (B, L, d_clip + d_t5): as wide as z, for
    stage 2. ``states`` gives (c, pooled (B, d_clip), T5's states (B, L, d_t5)).
    """

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel):
        super().__init__()
        self.clip, self.t5 = clip, t5
        self.widths = [clip.config.hidden_size, t5.config.d_model]
        fields = ({k: v for k, v in e.config.to_dict().items() if not k.startswith("_")} for e in (clip, t5))
        self.config = CLIPStackConfig(sum(self.widths), tuple(fields))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def states(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.hidden_size:
            raise ValueError(f"z is {z.shape[-1]} wide; these text encoders take {self.hidden_size} "
                             f"({' + '.join(map(str, self.widths))})")
        z_clip, z_t5 = z.split(self.widths, -1)
        clip = clip_from_embeds(self.clip, z_clip)  # (B, L, d_clip)
        t5 = self.t5(inputs_embeds=z_t5).last_hidden_state  # (B, L, d_t5)
        return torch.cat([clip, t5], dim=-1), clip[:, -1], t5

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.states(z)[0]


def encode_embeds(text_encoder: CLIPTextModel | CLIPStack | CLIPAndT5, z: torch.Tensor) -> torch.Tensor:
    """c = T(z) of any family's T (B, L, d_T): one CLIP's :func:`clip_from_embeds`, or a stack's own forward."""
    return clip_from_embeds(text_encoder, z) if isinstance(text_encoder, CLIPTextModel) else text_encoder(z)


# What a diffusers dir's model_index.json may name for a text encoder z goes through, and its config class.
TEXT_CLASSES = {"CLIPTextModel": (CLIPTextModel, CLIPTextConfig),
                "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig),
                "T5EncoderModel": (T5EncoderModel, T5Config)}


def text_class(model_index: dict, name: str) -> tuple[type, type]:
    """(model class, config class) a diffusers dir's model_index.json names for its text encoder ``name``."""
    listed = (model_index.get(name) or [None, None])[1]
    if listed not in TEXT_CLASSES:
        raise InvalidInput(f"the decoder's {name} is a {listed}; vlv feeds z to "
                           f"{', '.join(TEXT_CLASSES)} only")
    return TEXT_CLASSES[listed]


def assemble_text_encoder(parts: list[nn.Module]) -> CLIPTextModel | CLIPStack | CLIPAndT5:
    """A family's T from its text encoders in the dir's order: one CLIP (SD 2.x), CLIPs (SD3, SDXL), CLIP + T5
    (FLUX.1)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[-1], T5EncoderModel):
        return CLIPAndT5(*parts)
    return CLIPStack(parts)


def load_text_encoder(sd_dir: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> CLIPTextModel | CLIPStack | CLIPAndT5:
    """T alone from a diffusers dir (SD 2.x: its CLIP; SD3/SDXL: both CLIPs; FLUX.1: CLIP + T5), frozen, loaded
    straight into ``dtype`` on ``device``."""
    sd_dir = Path(sd_dir)
    names = family_of(sd_dir).text_encoders if (sd_dir / "model_index.json").is_file() else ("text_encoder",)
    for name in names:
        if not (sd_dir / name / "config.json").is_file():
            raise FileNotFoundError(f"{sd_dir} has no {name}/ (a Stable Diffusion dir holds one)")
    if names == ("text_encoder",):
        with quiet_library():
            te = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", dtype=dtype, device_map=device,
                                               local_files_only=True)
        return te.requires_grad_(False).eval()
    index = json.loads((sd_dir / "model_index.json").read_text())
    with quiet_library():  # each as its dir names it (SDXL's first CLIP has no projection)
        parts = [text_class(index, name)[0].from_pretrained(sd_dir / name, dtype=dtype, device_map=device,
                                                            local_files_only=True) for name in names]
    return assemble_text_encoder(parts).requires_grad_(False).eval()
