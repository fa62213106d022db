"""The VLV image encoder (stage 1): image -> Florence-2 -> Nq learnable queries -> phi -> caption embeddings z.

Paper Sec. 3.1 (arXiv 2507.07104), as ``docs/method.md`` "Stage 1" steps 1-4 state it:

    v' = projector(DaViT(image))                       (B, Nv, D)   visual tokens
    h_E = BART_encoder([v'; prompt token embeddings])  (B, Nv+P, D)
    h = BART_decoder(queries, cross-attn to h_E)       (B, Nq, D)   causal self-attention over the queries
    z = phi(h) = Linear(D, D) - GELU - Linear(D, d_T)  (B, Nq, d_T) in T's input token-embedding space

Everything is transformers' native ``Florence2ForConditionalGeneration`` (no remote code); vlv adds only the
queries and phi. The Florence architecture is a config JSON (``vlv/configs/florence2-*.json``), a
``Florence2Config`` dict, or a local native checkpoint dir; a named encoder (``vlv/configs/encoder-*.json``)
fixes the rest of an :class:`EncoderConfig`.

Checkpoints (``save_pretrained``) hold the config, the resolved Florence-2 config, and the trainable weights.
Frozen weights are saved too (``frozen.safetensors``) whenever they cannot be re-read from a pretrained
Florence-2 dir, i.e. whenever the Florence source is a config or a dict (random init): otherwise a reload
would silently get different random frozen weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import nn
from transformers import Florence2Config, Florence2ForConditionalGeneration

from vlv.checks import check_native_florence2, read_json
from vlv.config import CONFIGS, EncoderConfig, list_configs, read_config
from vlv.data.transforms import ImageTransform
from vlv.errors import InvalidInput
from vlv.modeling import (
    atomic_save_file,
    check_materialized,
    empty_model,
    in_run_dir,
    load_weights_file,
    round_weights,
    trainable_state,
    write_json,
)
from vlv.progress import quiet_library
from vlv.shipped import is_shipped, resolve_encoder, resolve_florence2_name

CONFIG_FILE, TRAINABLE_FILE, FROZEN_FILE = "encoder.json", "model.safetensors", "frozen.safetensors"


# -------------------------------------------------------------------------------------- florence-2
def list_florence2_configs() -> list[str]:
    return list_configs("florence2-")


def florence2_config(source: str | dict) -> Florence2Config:
    """A Florence2Config from a config stem or a dict (architecture only, no weights)."""
    if isinstance(source, dict):
        return Florence2Config.from_dict(source)
    if source not in list_florence2_configs():
        raise InvalidInput(f"unknown Florence-2 config {source!r}; choose from {', '.join(list_florence2_configs())}")
    return Florence2Config.from_dict(read_config(source))


def florence2_architecture(source: str | dict) -> Florence2Config:
    """The Florence2Config of any source (a config stem, a dict, a native checkpoint dir), no weights read: what
    ``vlv.training.plan`` builds on the meta device."""
    if not _is_checkpoint_dir(source):
        return florence2_config(source)
    path = check_native_florence2(resolve_florence2_name(str(source)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Florence-2 checkpoint at {path} (no config.json)")
    return Florence2Config.from_pretrained(path, local_files_only=True)


def load_florence2(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Florence2ForConditionalGeneration:
    """A native (transformers) Florence-2 checkpoint from a local dir or shipped name, loaded straight into
    ``dtype`` on ``device``; never a download."""
    path = check_native_florence2(resolve_florence2_name(str(path)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Florence-2 checkpoint at {path} (expected a local dir with config.json and "
                                f"weights in transformers' native Florence2 format); configs for random init: "
                                f"{', '.join(list_florence2_configs())}")
    with quiet_library():
        return Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device,
                                                                 local_files_only=True)


def build_florence2(source: str | dict) -> Florence2ForConditionalGeneration:
    """Random init from a config stem or dict, else load the local checkpoint dir ``source``."""
    if isinstance(source, dict) or (CONFIGS / f"{source}.json").exists():
        return Florence2ForConditionalGeneration(florence2_config(source))
    return load_florence2(source)


def resolved_florence2(config: EncoderConfig, run: str | Path) -> str | dict:
    """The Florence-2 source of a run dir's config as one that works from anywhere (a dir inside the run, absolute)."""
    if not _is_checkpoint_dir(config.florence2) or is_shipped(config.florence2):
        return config.florence2
    return str(Path(in_run_dir(run, config.florence2)).resolve())


def _is_checkpoint_dir(source: str | dict) -> bool:
    return not isinstance(source, dict) and not (CONFIGS / f"{source}.json").exists()


def _prompt_ids(config: EncoderConfig, florence: Florence2ForConditionalGeneration) -> list[int]:
    if config.prompt_ids is not None:
        return config.prompt_ids
    text = florence.config.text_config
    if not _is_checkpoint_dir(config.florence2):
        return [text.bos_token_id, text.eos_token_id]
    from transformers import AutoTokenizer

    # Checked by hand: transformers 5's AutoTokenizer builds an EMPTY tokenizer from config.json when a dir
    # has no tokenizer files, instead of raising.
    source = Path(resolve_florence2_name(config.florence2))
    if not any((source / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"no tokenizer in {config.florence2} to tokenise the prompt: set prompt_ids")
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    # As Florence2Processor builds its text: <s> + prompt + </s>, no other special tokens.
    return tok(tok.bos_token + config.prompt + tok.eos_token, add_special_tokens=False).input_ids


@torch.no_grad()
def _init_query_attention(florence: Florence2ForConditionalGeneration, std: float) -> None:
    """Why: in a random-init tiny BART (init_std 0.02) the queries' cross-attention is near uniform and strongly
    damped, so the query outputs of two different images barely differ and no training signal reaches the image
    path; a linear probe on the BART encoder's outputs does read the scene (``benchmarks/probes/encoder.py``).
    A larger std makes the queries' outputs depend on the image from the first step."""
    for layer in florence.model.language_model.decoder.layers:
        attn = layer.encoder_attn
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            linear.weight.normal_(0.0, std)


# ------------------------------------------------------------------------------------------ encoder
class VLVEncoder(nn.Module):
    """Image -> caption embeddings z (B, Nq, d_T); the one Florence -> queries -> phi path both stages call."""

    def __init__(self, config: EncoderConfig, florence: Florence2ForConditionalGeneration | None = None):
        super().__init__()
        self.florence = florence if florence is not None else build_florence2(config.florence2)
        if config.query_attention_init_std is not None and florence is None and not _is_checkpoint_dir(
                config.florence2):
            _init_query_attention(self.florence, config.query_attention_init_std)
        text = self.florence.config.text_config
        d = text.d_model  # D
        if config.num_queries > text.max_position_embeddings:
            raise InvalidInput(f"num_queries {config.num_queries} > the BART decoder's "
                               f"{text.max_position_embeddings} positions")
        if self.florence.config.vision_config.projection_dim != d:
            raise InvalidInput("vision_config.projection_dim must equal text_config.d_model")
        self.config = replace(config, prompt_ids=_prompt_ids(config, self.florence))  # resolved ids are saved
        self.register_buffer("prompt_ids", torch.tensor(self.config.prompt_ids, dtype=torch.long), persistent=False)
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, d))  # q ~ N(0, 1), (1, Nq, D)
        self.phi = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, config.text_dim))
        if config.phi_init_gain is not None:
            self._scale_phi(config.phi_init_gain)
        self._freeze(config.trainable)
        if config.frozen_dtype is not None:
            self._round_frozen(config.frozen_dtype)

    @torch.no_grad()
    def _round_frozen(self, dtype: str) -> None:
        """Why: an official checkpoint saved under mixed precision holds the frozen Florence-2 weights rounded to
        ``dtype``, and the official code computes with those; vlv reads them from the base dir and rounds alike.
        Trainable weights are the checkpoint's own, loaded afterwards."""
        frozen = [p for p in self.florence.parameters() if not p.requires_grad] + list(self.florence.buffers())
        round_weights(frozen, dtype)

    @torch.no_grad()
    def _scale_phi(self, gain: float) -> None:
        """Why: trained encoders write z far above the scale of T's token embeddings, so z dominates CLIP's residual
        stream; from PyTorch's init a run spends its first thousands of steps growing z. Started larger, it
        does not (a recipe setting: ``phi_init_gain``)."""
        self.phi[-1].weight.mul_(gain)
        self.phi[-1].bias.mul_(gain)

    def _freeze(self, trainable: list[str] | Literal["all"]) -> None:
        """Declarative freezing: a parameter trains iff its name starts with one of the prefixes."""
        names = [n for n, _ in self.named_parameters()]
        if trainable != "all":
            for prefix in trainable:
                if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                    raise InvalidInput(f"trainable prefix {prefix!r} matches no parameter")
        for n, p in self.named_parameters():
            p.requires_grad_(trainable == "all" or any(n == x or n.startswith(x + ".") for x in trainable))

    def train(self, mode: bool = True) -> VLVEncoder:
        """Fully frozen Florence parts stay in eval mode, so their dropout / drop-path never perturb features."""
        super().train(mode)
        for part in self.florence.model.children():
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    @property
    def vision_frozen(self) -> bool:
        """From the parameters themselves (stage 2 re-freezes the encoder); the config's ``trains_vision`` is
        what holds before anything is built."""
        model = self.florence.model
        return not any(p.requires_grad for m in (model.vision_tower, model.multi_modal_projector)
                       for p in m.parameters())

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """v' = projector(DaViT(pixel_values)): (B, 3, S, S) -> (B, Nv, D), the pooled token + H*W tokens.

        The frozen DaViT is the largest frozen cost at full scale (docs/performance.md): no graph through it when
        nothing there trains, and stage 1 can cache its output per image (``vlv.data.caches.vision_rows``).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            return self.florence.model.get_image_features(pixel_values).pooler_output  # (B, Nv, D)

    def forward(self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
                ) -> torch.Tensor:
        """pixel_values (B, 3, S, S), as ``transform`` makes them, or their cached ``image_features``
        (B, Nv, D) -> z (B, Nq, d_T)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        if image_features is not None and torch.is_grad_enabled() and not self.vision_frozen:
            raise ValueError("image_features skip the vision tower, which trains in this encoder: pass pixel_values")
        model = self.florence.model
        lm = model.language_model  # BartModel
        v = self.image_features(pixel_values) if image_features is None else image_features  # (B, Nv, D)
        b = v.shape[0]
        prompt = model.get_input_embeddings()(self.prompt_ids)[None].expand(b, -1, -1)  # (B, P, D)
        x = torch.cat([v, prompt.to(v.dtype)], dim=1)  # (B, Nv + P, D)
        h_e = lm.encoder(inputs_embeds=x).last_hidden_state  # (B, Nv + P, D)
        queries = self.queries.expand(b, -1, -1)  # (B, Nq, D)
        h = lm.decoder(inputs_embeds=queries, encoder_hidden_states=h_e, use_cache=False).last_hidden_state
        return self.phi(h)  # (B, Nq, d_T)

    # ----------------------------------------------------------------------------------- images
    @property
    def transform(self) -> ImageTransform:
        """How an image becomes this encoder's pixel_values (``config.transform``): what training, inference and
        the API all call."""
        c = self.config
        return ImageTransform(c.transform, c.crop_size or c.image_size, c.image_size, c.image_mean, c.image_std)

    def preprocess(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Images (PIL or files) -> pixel_values (B, 3, S, S) by this encoder's transform."""
        return self.transform(images)

    # ---------------------------------------------------------------------------------- save/load
    def save_pretrained(self, out: str | Path, include_frozen: bool | None = None) -> Path:
        """encoder.json + trainable weights; frozen weights too unless they come from a Florence-2 checkpoint dir."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if include_frozen is None:
            include_frozen = not _is_checkpoint_dir(self.config.florence2)
        meta = {"config": asdict(self.config), "florence2": self.florence.config.to_dict()}
        atomic_save_file(trainable_state(self), out / TRAINABLE_FILE)
        frozen = trainable_state(self, trainable=False)
        (out / FROZEN_FILE).unlink(missing_ok=True)
        if include_frozen and frozen:
            atomic_save_file(frozen, out / FROZEN_FILE)
        write_json(out / CONFIG_FILE, meta)  # last: its presence marks a complete dir
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> VLVEncoder:
        """Rebuild from ``save_pretrained`` output (or a shipped name, ``shapes-stage1``) in ``dtype`` on
        ``device``; keys must match exactly (trainable, and frozen when saved).

        Built empty and filled from the files (or, for frozen weights, from the Florence-2 dir), so the weights
        are read once, straight into ``dtype``.
        """
        path = resolve_encoder(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no VLV encoder at {path} (no {CONFIG_FILE})")
        meta = read_json(path / CONFIG_FILE, keys=("config",))
        config = EncoderConfig(**meta["config"])
        has_frozen = (path / FROZEN_FILE).is_file()
        if has_frozen or config.trainable == "all":
            florence = empty_model(lambda: Florence2ForConditionalGeneration(Florence2Config.from_dict(
                meta["florence2"])), dtype)
        elif _is_checkpoint_dir(config.florence2):
            florence = load_florence2(in_run_dir(path, config.florence2), dtype=dtype, device=device)
        else:
            raise FileNotFoundError(f"{path} has no {FROZEN_FILE} and its Florence-2 source {config.florence2!r} "
                                    f"is a random-init config: the frozen weights cannot be rebuilt")
        model = empty_model(lambda: cls(config, florence), dtype)
        load_weights_file(model, path / TRAINABLE_FILE, dtype=dtype, device=device)
        if has_frozen:
            load_weights_file(model, path / FROZEN_FILE, trainable=False, dtype=dtype, device=device)
        check_materialized(model, str(path))
        return model.to(device)  # the buffers; the weights are there already
