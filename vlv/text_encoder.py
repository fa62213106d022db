"""T: the frozen text encoder of the text-to-image model, applied to caption embeddings z instead of token ids.

Paper Sec. 3.1-3.2: c = T(inputs_embeds=z), learned positions 0..Nq-1 added, causal CLIP encoder, final
LayerNorm: (B, Nq, d_T). Stage 1 conditions the frozen UNet on c (``vlv.decoder``); stage 2 feeds c to psi
(``vlv.captioner``). Stage 2 needs T alone, so it is loaded without the UNet and VAE. A model with several CLIPs
(SD3) has a :class:`CLIPStack` for T: z's channels split among them, c their penultimate states side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection
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


def encode_embeds(text_encoder: CLIPTextModel | CLIPStack, z: torch.Tensor) -> torch.Tensor:
    """c = T(z) of any family's T (B, L, d_T): a CLIPStack's concatenated states, or one CLIP's
    :func:`clip_from_embeds`."""
    return text_encoder(z) if isinstance(text_encoder, CLIPStack) else clip_from_embeds(text_encoder, z)


def clip_class(model_index: dict, name: str) -> type[CLIPTextModel | CLIPTextModelWithProjection]:
    """The CLIP class a diffusers dir's model_index.json names for its text encoder ``name``."""
    listed = (model_index.get(name) or [None, None])[1]
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    if listed not in classes:
        raise InvalidInput(f"the decoder's {name} is a {listed}; vlv feeds z to CLIP text encoders only")
    return classes[listed]


def load_text_encoder(sd_dir: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> CLIPTextModel | CLIPStack:
    """T alone from a diffusers dir (SD 2.x: its CLIP; SD3: both CLIPs as a :class:`CLIPStack`), frozen, loaded
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
    with quiet_library():  # each CLIP as its dir names it (SDXL's first has no projection)
        encoders = [clip_class(index, name).from_pretrained(sd_dir / name, dtype=dtype, device_map=device,
                                                            local_files_only=True) for name in names]
    return CLIPStack(encoders).requires_grad_(False).eval()
