"""The families of frozen text-to-image models vlv distils from, told apart as diffusers tells them apart: by the
pipeline class a dir's ``model_index.json`` names (``_class_name``).

Torch-free: the checks read this table before a weight loads. Each family's decoder is a
:class:`vlv.decoder.DiffusionDecoder` in its own module (``vlv.decoders.sd2``, ``sd3``, ``sdxl``, ``flux``), imported
only when a decoder of it is built.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from vlv.errors import InvalidInput


@dataclass(frozen=True)
class Family:
    """What a family's dir holds: its denoiser, the text encoders z goes through (in the order z's channels are
    split among them), their tokenizers, the decoder class (``module:Class``), and its training loss."""

    name: str
    pipeline: str  # diffusers' pipeline class, model_index.json's _class_name
    denoiser: str  # "unet" or "transformer"
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    decoder: str
    loss: str  # "ddpm" (eps / v on a DDPM schedule) or "flow matching"

    @property
    def parts(self) -> tuple[str, ...]:
        """The dir's sub-folders vlv loads (the T5 of SD3 is not one: z never goes through it)."""
        return (self.denoiser, "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    def decoder_class(self) -> type:
        module, name = self.decoder.split(":")
        return getattr(importlib.import_module(module), name)


SD2 = Family("sd2", "StableDiffusionPipeline", "unet", ("text_encoder",), ("tokenizer",),
             "vlv.decoders.sd2:SD2Decoder", "ddpm")
SD3 = Family("sd3", "StableDiffusion3Pipeline", "transformer", ("text_encoder", "text_encoder_2"),
             ("tokenizer", "tokenizer_2"), "vlv.decoders.sd3:SD3Decoder", "flow matching")
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"),
              ("tokenizer", "tokenizer_2"), "vlv.decoders.sdxl:SDXLDecoder", "ddpm")
FLUX = Family("flux", "FluxPipeline", "transformer", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
              "vlv.decoders.flux:FluxDecoder", "flow matching")
FAMILIES = {f.pipeline: f for f in (SD2, SD3, SDXL, FLUX)}
# Families diffusers has that vlv does not distil from yet: refused in one line naming them.
NOT_YET = {"PixArtSigmaPipeline": "PixArt-Sigma"}


def family_named(pipeline: str, where: str | Path = "this decoder") -> Family:
    """The family of a diffusers pipeline class name; InvalidInput naming any other."""
    if pipeline in FAMILIES:
        return FAMILIES[pipeline]
    known = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())
    if pipeline in NOT_YET:
        raise InvalidInput(f"{where}: a {NOT_YET[pipeline]} dir ({pipeline}); vlv does not distil from "
                           f"{NOT_YET[pipeline]} yet (it takes {known})")
    raise InvalidInput(f"{where}: its model_index.json names {pipeline!r}; vlv takes {known}")


def family_of(sd_dir: str | Path) -> Family:
    """The family of a diffusers dir, from its model_index.json (read, nothing built)."""
    index = Path(sd_dir) / "model_index.json"
    try:
        pipeline = json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise InvalidInput(f"{sd_dir}: its model_index.json does not read ({e.__class__.__name__})") from None
    return family_named(str(pipeline), sd_dir)
