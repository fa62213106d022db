"""The captioning language model of stage 2: LM sources, their tokenizers, and caption tokenisation.

At full scale stage 2 decodes with a pretrained causal LLM (Qwen2.5-3B base, ``docs/method.md`` "Stage 2"),
read from a local checkpoint dir exactly as transformers reads any (``AutoModelForCausalLM`` +
``AutoTokenizer``). An LM source is one of: a config stem in ``vlv/configs`` whose JSON is a causal-LM config
(random init), a config dict with ``model_type`` (random init), or a local checkpoint dir (pretrained weights;
the shipped ``shapes-lm`` is one). Random-init sources have no tokenizer of their own: the caller brings one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlv.config import CONFIGS, read_config
from vlv.errors import InvalidInput
from vlv.progress import quiet_library
from vlv.shipped import resolve_lm_name

IGNORE = -100  # the label transformers' cross-entropy skips
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


# ------------------------------------------------------------------------------------------ sources
def list_lm_configs() -> list[str]:
    """Config stems whose JSON is a causal-LM config (``architectures`` names a ``*ForCausalLM``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.json")
                  if any(a.endswith("ForCausalLM") for a in read_config(p.stem).get("architectures", [])))


def check_lm_source(source: str) -> None:
    """An LM source a user named: a config stem (random init), or an LM dir whose weights read; never both."""
    from vlv.checks import check_name_or_path, check_weights_in, read_json

    check_name_or_path(source, list_lm_configs(), "LM config", "--lm")
    if is_lm_dir(source):
        path = Path(resolve_lm_name(source))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--lm {source}: no causal LM there (no config.json), nor an LM config of "
                                    f"{', '.join(list_lm_configs())}")
        read_json(path / "config.json")
        check_weights_in(path)


def is_lm_dir(source: str | dict) -> bool:
    """True when the source is a checkpoint dir (pretrained weights; the shipped ``shapes-lm`` is one), not a
    config stem or a dict (random init)."""
    return not isinstance(source, dict) and source not in list_lm_configs()


def lm_config(source: str | dict) -> PreTrainedConfig:
    """The architecture of a config stem or a config dict (``model_type`` picks the class)."""
    if isinstance(source, dict):
        data = dict(source)
    elif source in list_lm_configs():
        data = read_config(source)
    else:
        raise InvalidInput(f"unknown LM config {source!r}; choose from {', '.join(list_lm_configs())} or give a dir")
    if "model_type" not in data:
        raise InvalidInput("an LM config dict needs a 'model_type' (e.g. 'qwen2')")
    return AutoConfig.for_model(**data)


def build_lm(source: str | dict, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
             empty: bool = False) -> PreTrainedModel:
    """Random init from a config stem or dict, else the local checkpoint dir ``source``, in ``dtype`` on
    ``device``; never a download. ``empty``: a config's architecture with its parameters on the meta device, for
    weights that come from another file (``vlv.modeling.load_weights_file``).

    The dtype is explicit: transformers 5 builds ``from_config`` in the config's stored dtype (Qwen2.5-3B's says
    bfloat16), and precision belongs to the caller (fp32 for training).
    """
    if not is_lm_dir(source):
        config = lm_config(source)
        if empty:
            from vlv.modeling import empty_model

            return empty_model(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype), dtype)
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)  # on the default device (meta when built so)
        return lm if device is None else lm.to(device)
    if empty:
        raise ValueError("empty=True builds a config's architecture; a checkpoint dir is loaded with its weights")
    path = Path(resolve_lm_name(source))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no causal LM at {path} (expected a local dir with config.json and weights); "
                                f"configs for random init: {', '.join(list_lm_configs())}")
    with quiet_library():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, local_files_only=True)


def load_tokenizer(source: str | dict) -> PreTrainedTokenizerBase:
    """The checkpoint dir's own tokenizer; a random-init source has none, so its caller must bring one."""
    if not is_lm_dir(source):
        raise InvalidInput(f"the LM source {source if isinstance(source, str) else 'dict'!r} is a random-init config "
                           "with no tokenizer: pass a tokenizer")
    source = resolve_lm_name(source)
    # transformers 5's AutoTokenizer builds an EMPTY tokenizer from config.json when a dir has no tokenizer
    # files, instead of raising (``vlv.encoder`` checks the same).
    if not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source}")
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's pad, else its EOS (Qwen: pad == eos). Padding is masked, never read."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the LM could never learn to stop")
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, L) right-padded with ``pad``, and the attention mask (B, L) of the real tokens."""
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)  # (B, L)
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long)  # (B, L)
    return ids, mask


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    """``[start] text [eos]`` per text, start = BOS (EOS when the tokenizer has none, GPT-style).

    Labels are the ids with padding set to IGNORE by the attention mask, not by id (pad may equal eos).
    """
    eos = tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    rows = [[start, *ids, eos] for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    ids, mask = right_pad(rows, pad_id(tokenizer))  # (B, L) each
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}
