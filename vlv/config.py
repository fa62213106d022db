"""The configs of vlv's models, apart from the models (as transformers keeps configuration_*.py): dataclasses
whose fields carry their help text, serialised as JSON next to the weights. Importing this module loads no torch,
so the command line builds its flags from these fields at once.

``vlv/configs/`` holds the architecture JSONs, by stem: Florence-2, Stable Diffusion 2.1 and Qwen2 configs, and
the named encoders (``encoder-<name>.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vlv.errors import InvalidInput

CONFIGS = Path(__file__).parent / "configs"  # architecture JSONs, by stem (open_clip's model_configs)
# Caches of what training freezes (vlv.data.caches): images per forward of the frozen part, and rows per shard
# (a multiple of every batch size, so batches never straddle shards).
CACHE_BATCH_SIZE = {"latents": 128, "vision": 32, "text_embeds": 32}
CACHE_SHARD_ROWS = 4096
# The two samplers, defined once for every command and function that draws images (vlv.diffusion.with_sampler
# builds their schedulers): paper is DDPM for 50 steps, the official code's default; fast is DPM-Solver++(2M).
# Flow-matching decoders (SD3, FLUX) sample both with their own FlowMatchEuler scheduler, at these step counts.
SAMPLERS = {"fast": "DPM-Solver++(2M)", "paper": "DDPM"}
DEFAULT_STEPS = {"fast": 20, "paper": 50}
# Classifier-free guidance scale: the paper's (and the official code's) 2.0, the scale every shipped number is
# measured at, for reconstruction and the teacher's own text-to-image sampling alike.
DEFAULT_GUIDANCE = 2.0


def list_configs(prefix: str = "") -> list[str]:
    """Stems of the architecture JSONs shipped in ``vlv/configs`` that start with ``prefix``."""
    return sorted(p.stem for p in CONFIGS.glob(f"{prefix}*.json"))


def read_config(stem: str) -> dict:
    """The shipped architecture JSON ``vlv/configs/<stem>.json`` as a dict."""
    return json.loads((CONFIGS / f"{stem}.json").read_text())


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Florence-2's preprocessor_config.json
IMAGENET_STD = (0.229, 0.224, 0.225)
# Official stage 1: queries, phi and Florence's language model (shared embeddings, BART encoder + decoder) train.
DEFAULT_TRAINABLE = ("queries", "phi", "florence.model.language_model")
VISION_MODULES = ("florence.model.vision_tower", "florence.model.multi_modal_projector")  # DaViT, projector


TRANSFORMS = ("vlv", "official")  # image transforms (vlv.data.transforms)
FROZEN_DTYPES = ("bfloat16", "float16")  # what an official checkpoint's mixed precision saves frozen weights in


def check_frozen_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in FROZEN_DTYPES:
        raise InvalidInput(f"frozen weights can be rounded to {' or '.join(FROZEN_DTYPES)}, not {dtype!r}")


# ----------------------------------------------------------------------------------- encoder config
@dataclass
class EncoderConfig:
    """Everything that defines a VLV encoder; saved as JSON next to its weights."""

    text_dim: int = field(metadata={"help": "d_T, the width of the T2I text encoder z feeds: read it from the "
                                            "decoder (DiffusionDecoder.text_dim)"})
    florence2: str | dict = field(default="florence2-large", metadata={
        "help": "Florence-2 architecture: a config stem in vlv/configs (florence2-large, florence2-shapes), a "
                "Florence2Config dict (both random init), or a local native Florence-2 checkpoint dir (a relative "
                "one is read against the run dir first)."})
    image_size: int = field(default=768, metadata={"help": "square input side; Florence-2's processor uses 768"})
    num_queries: int = field(default=77, metadata={"help": "Nq learnable queries = caption-embedding length"})
    # Kept with the architecture, as peft's LoraConfig keeps target_modules: it also says which tensors the
    # checkpoint's model.safetensors holds and which come from the Florence-2 source.
    trainable: list[str] | Literal["all"] = field(default_factory=lambda: list(DEFAULT_TRAINABLE), metadata={
        "help": "parameter-name prefixes that train (the rest is frozen), or 'all'"})
    prompt: str = field(default="Describe with a paragraph what is shown in the image.", metadata={
        "help": "task prompt text (Florence's expansion of <MORE_DETAILED_CAPTION>); tokenised with the "
                "checkpoint dir's tokenizer as <s>prompt</s> when prompt_ids is None"})
    prompt_ids: list[int] | None = field(default=None, metadata={
        "help": "prompt token ids; None: from the tokenizer of a checkpoint dir, or [bos, eos] (the empty "
                "prompt) for a random-init Florence, which has no tokenizer"})
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    query_attention_init_std: float | None = field(default=None, metadata={
        "help": "random-init Florence only: re-draw the BART decoder's cross-attention weights with this std "
                "(BART's own init_std is 0.02), so the queries read the image from the first step"})
    phi_init_gain: float | None = field(default=None, metadata={
        "help": "scale phi's output layer (weight and bias) by this at init, so z starts near the norm trained "
                "encoders reach (see VLVEncoder._scale_phi); None: PyTorch's default init"})
    transform: str = field(default="vlv", metadata={
        "help": "how an image becomes pixel_values (vlv.data.transforms): 'vlv' (centre square, PIL bicubic to "
                "crop_size, then torch bicubic to image_size: vlv's training path) or 'official' (torchvision's "
                "Resize + CenterCrop to crop_size, then Florence-2's processor: the official code's)"})
    crop_size: int | None = field(default=None, metadata={
        "help": "side of the square an image is cut to before the resize to image_size: the data resolution "
                "stage 1 trained at, or the official --image_size (384); None: image_size"})
    frozen_dtype: str | None = field(default=None, metadata={
        "help": "imported encoders only: the dtype an official checkpoint saved the frozen Florence-2 weights in "
                "(bfloat16 under --mixed_precision bf16); weights read from the Florence-2 dir are rounded to it, "
                "so the encoder computes with what the checkpoint holds. None: as the dir holds them"})

    def __post_init__(self) -> None:
        if self.trainable != "all":
            if isinstance(self.trainable, str) or not self.trainable:
                raise InvalidInput(f"trainable must be 'all' or a non-empty list of prefixes, got {self.trainable!r}")
            self.trainable = list(self.trainable)
        if self.num_queries <= 0 or self.text_dim <= 0 or self.image_size <= 0:
            raise InvalidInput("num_queries, text_dim and image_size must be positive")
        if self.phi_init_gain is not None and self.phi_init_gain <= 0:
            raise InvalidInput(f"phi_init_gain must be positive, got {self.phi_init_gain}")
        if self.transform not in TRANSFORMS:
            raise InvalidInput(f"transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        if self.crop_size is not None and self.crop_size <= 0:
            raise InvalidInput(f"crop_size must be positive, got {self.crop_size}")
        check_frozen_dtype(self.frozen_dtype)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if self.prompt_ids is not None:
            self.prompt_ids = [int(i) for i in self.prompt_ids]

    @property
    def trains_vision(self) -> bool:
        """Whether a trainable prefix reaches the DaViT or its projector; known before the model is built."""
        if self.trainable == "all":
            return True
        return any(m == p or m.startswith(p + ".") or p.startswith(m + ".")
                   for p in self.trainable for m in VISION_MODULES)

    @classmethod
    def named(cls, name: str, text_dim: int, **overrides) -> EncoderConfig:
        """A named encoder (``vlv/configs/encoder-<name>.json``) for a decoder of width ``text_dim``, with overrides."""
        if name not in list_encoders():
            raise InvalidInput(f"unknown encoder {name!r}; choose from {', '.join(list_encoders())} or give a "
                               "local Florence-2 dir")
        return cls(text_dim=text_dim, **{**read_config(f"encoder-{name}"), **overrides})


def list_encoders() -> list[str]:
    """Names of the encoder configs shipped in ``vlv/configs`` (``encoder-<name>.json``)."""
    return [n.removeprefix("encoder-") for n in list_configs("encoder-")]


TRAINABLE_LEVELS = ("mlp", "mlp+llm", "mlp+llm+encoder")
POSTPROCESS = (None, "official")  # caption clean-up rules (vlv.captioner.postprocess)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen2's projections


# --------------------------------------------------------------------------------- captioner config
@dataclass
class CaptionerConfig:
    """Everything that defines a captioner beyond its frozen inputs; saved as JSON next to its weights."""

    text_dim: int = field(metadata={"help": "d_T, the width of T and of z: read it from the decoder's text encoder"})
    lm: str | dict = field(default="qwen2.5-3b", metadata={
        "help": "causal LM: a config stem in vlv/configs (qwen2.5-3b, qwen2-shapes) or a config dict (both random "
                "init; the caller brings the tokenizer), or a local checkpoint dir with its tokenizer"})
    trainable: str = field(default="mlp+llm+encoder", metadata={
        "help": "mlp | mlp+llm | mlp+llm+encoder (paper Table 4 right; the last is the paper's best and official)"})
    max_new_tokens: int = field(default=300, metadata={
        "help": "generation length cap (official 300); training truncates caption + EOS to the same length"})
    num_beams: int = field(default=4, metadata={"help": "default beam count of generate (official 4)"})
    lora_rank: int = field(default=0, metadata={
        "help": "0: the llm levels train every LLM weight; r > 0: they train rank-r LoRA adapters (peft) instead"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator: updates are scaled by alpha / r"})
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "names of the LLM's linear layers that get adapters"})
    text_encoder: str | None = field(default=None, metadata={
        "help": "where T comes from: a Stable Diffusion dir or shipped name, whose text_encoder/ is loaded"})
    encoder: str | None = field(default=None, metadata={
        "help": "where the stage-1 encoder comes from: a stage-1 run dir or shipped name (shapes-stage1)"})
    postprocess: str | None = field(default=None, metadata={
        "help": "text clean-up after decoding: None (none) or 'official' (the official Caption_inference."
                "process_caption: cut after the last '.', drop repeated sentences; for models that never stop)"})
    text_encoder_dtype: str | None = field(default=None, metadata={
        "help": "imported captioners only: the dtype an official checkpoint saved T in (bfloat16 under "
                "--mixed_precision bf16); T read from the decoder dir is rounded to it. None: as the dir holds it"})

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_LEVELS:
            raise InvalidInput(f"trainable must be one of {', '.join(TRAINABLE_LEVELS)}, got {self.trainable!r}")
        if self.text_dim <= 0 or self.max_new_tokens <= 0 or self.num_beams <= 0:
            raise InvalidInput("text_dim, max_new_tokens and num_beams must be positive")
        check_lora(self.trainable, self.lora_rank)
        if self.postprocess not in POSTPROCESS:
            raise InvalidInput(f"postprocess must be one of {POSTPROCESS}, got {self.postprocess!r}")
        check_frozen_dtype(self.text_encoder_dtype)

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0


def check_lora(trainable: str, lora_rank: int) -> None:
    """LoRA replaces full LLM training, so it needs a level that trains the LLM."""
    if lora_rank < 0:
        raise InvalidInput(f"lora_rank must be >= 0, got {lora_rank}")
    if lora_rank and "llm" not in trainable:
        raise InvalidInput(f"LoRA adapts the LLM: use it with level mlp+llm or mlp+llm+encoder, not {trainable}")
