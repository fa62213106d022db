"""The captioning language model of stage 2: LM presets, the shapes LM tokenizer, and LM pre-training.

At full scale stage 2 decodes with a pretrained causal LLM (Qwen2.5-3B base, ``shared/specs/method.md``
"Stage 2"). No pretrained LLM speaks the shapes world, so vlv makes its stand-in: a tiny
``Qwen2ForCausalLM`` (preset ``qwen2-shapes``) pre-trained as a plain causal LM on the captions' text,
``[bos] caption [eos]``, and written with ``save_pretrained``. Stage 2 then reads that dir exactly as it
would read a hub checkpoint dir (``AutoModelForCausalLM`` + ``AutoTokenizer``).

An LM source is one of: a preset stem in ``vlv/presets`` whose JSON is a causal-LM config (random init),
a config dict with ``model_type`` (random init), or a local checkpoint dir (pretrained weights).
Random-init sources have no tokenizer of their own and use the shapes tokenizer, whose 336 ids fit any
vocabulary (as ``vlv.decoder.random_pipeline`` does for CLIP).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Tokenizer,
)

from vlv.data import atomic_write_text, read_records
from vlv.presets import resolve_lm_name
from vlv.train import TrainConfig, train
from vlv.world import shapes

PRESETS = Path(__file__).parent / "presets"
LM_FILE = "lm.json"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in the qwen2-shapes preset's config
IGNORE = -100  # the label transformers' cross-entropy skips
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


# ---------------------------------------------------------------------------------------- tokenizer
def caption_words() -> list[str]:
    """Every word of the shapes caption grammar (``shapes.caption``), commas excluded."""
    positions = dict.fromkeys(w for p in shapes.POSITIONS for w in p.split())  # top, left, right, bottom
    return ["a", *shapes.SIZES, *shapes.COLORS, *shapes.SHAPES, "at", "the", *positions, "and"]


def build_shapes_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's own byte-level BPE pipeline over a tiny vocabulary: one token per caption word, ``,`` included.

    Why Qwen2Tokenizer and not a word-level ``tokenizers`` model: for a dir whose config.json says
    ``model_type: qwen2``, transformers 5's ``AutoTokenizer`` ignores the saved ``tokenizer_class`` and rebuilds
    Qwen2Tokenizer's pipeline from tokenizer.json's vocab and merges; a word-level tokenizer comes back as
    garbage. Built as a Qwen2Tokenizer it reloads exactly, and the shapes LM is Qwen2 down to its tokenizer.

    Vocabulary: the specials, the caption pieces (``a``, ``,``, ``Ġsmall`` ...), all 256 byte symbols (so any
    text encodes and decode(encode(text)) == text, no <unk> in practice), and the prefixes the merges build
    words through (``Ġs``, ``Ġsm`` ...). The merges only ever extend a ``Ġ``-prefix, so each word of the
    grammar becomes exactly one token. Like Qwen's, encoding adds no special tokens.
    """
    words = caption_words()
    merges: list[tuple[str, str]] = []
    for word in words:  # Ġ+s -> Ġs, Ġs+m -> Ġsm, ... -> Ġsmall
        prefix = "Ġ"
        for ch in word:
            if (prefix, ch) not in merges:
                merges.append((prefix, ch))
            prefix += ch
    pieces = ["a", ",", *("Ġ" + w for w in words)]  # what captions are made of: a caption starts with "a"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = dict.fromkeys([*SPECIAL, *pieces, *alphabet, *(a + b for a, b in merges)])
    return Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                          bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


# ------------------------------------------------------------------------------------------ sources
def list_lm_presets() -> list[str]:
    """Preset stems whose JSON is a causal-LM config (``architectures`` names a ``*ForCausalLM``)."""
    return sorted(p.stem for p in PRESETS.glob("*.json")
                  if any(a.endswith("ForCausalLM") for a in json.loads(p.read_text()).get("architectures", [])))


def is_lm_dir(source: str | dict) -> bool:
    """True when the source is a checkpoint dir (pretrained weights; the shipped ``shapes-lm`` is one), not a
    preset or a dict (random init)."""
    return not isinstance(source, dict) and source not in list_lm_presets()


def lm_config(source: str | dict) -> PreTrainedConfig:
    """The architecture of a preset stem or a config dict (``model_type`` picks the class)."""
    if isinstance(source, dict):
        data = dict(source)
    elif source in list_lm_presets():
        data = json.loads((PRESETS / f"{source}.json").read_text())
    else:
        raise ValueError(f"unknown LM preset {source!r}; choose from {', '.join(list_lm_presets())} or give a dir")
    if "model_type" not in data:
        raise ValueError("an LM config dict needs a 'model_type' (e.g. 'qwen2')")
    return AutoConfig.for_model(**data)


def build_lm(source: str | dict) -> PreTrainedModel:
    """Random init from a preset or dict, else the local checkpoint dir ``source``; fp32 either way, never a download.

    fp32 is explicit: transformers 5 builds ``from_config`` in the config's stored dtype (Qwen2.5-3B's says
    bfloat16), and precision belongs to the training loop.
    """
    if not is_lm_dir(source):
        return AutoModelForCausalLM.from_config(lm_config(source), dtype=torch.float32)
    path = Path(resolve_lm_name(source))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no causal LM at {path} (expected a local dir with config.json and weights); "
                                f"presets for random init: {', '.join(list_lm_presets())}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)


def load_tokenizer(source: str | dict) -> PreTrainedTokenizerBase:
    """The checkpoint dir's own tokenizer; the shapes tokenizer for random-init sources."""
    if not is_lm_dir(source):
        return build_shapes_tokenizer()
    source = resolve_lm_name(source)
    # transformers 5's AutoTokenizer builds an EMPTY tokenizer from config.json when a dir has no tokenizer
    # files, instead of raising (vlv/encoder.py notes the same).
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


# ------------------------------------------------------------------------------------- pre-training
def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    """``[start] text [eos]`` per text, start = BOS (EOS when the tokenizer has none, GPT-style).

    Labels are the ids with padding set to IGNORE by the attention mask, not by id (pad may equal eos).
    """
    eos = tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    rows = [[start, *ids, eos] for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    ids, mask = right_pad(rows, pad_id(tokenizer))  # (B, L) each
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


class LMTask:
    """Trainable: the whole LM. Loss: next-token cross-entropy on ``[bos] caption [eos]`` (padding ignored)."""

    name = "lm"

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, captions: list[str],
                 val_captions: list[str] | None = None, seed: int = 0, eval_samples: int = 64):
        if len(tokenizer) > lm.config.get_text_config().vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the LM's vocabulary only "
                             f"{lm.config.get_text_config().vocab_size}")
        self.lm, self.tokenizer, self.captions, self.val_captions = lm, tokenizer, captions, val_captions
        self.seed, self.eval_samples = seed, eval_samples

    def trainable(self) -> torch.nn.Module:
        return self.lm

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        idx = np.random.default_rng([self.seed, step, rank]).integers(len(self.captions), size=batch_size)
        docs = encode_documents(self.tokenizer, [self.captions[i] for i in idx])
        return {k: v.to(device) for k, v in docs.items()}  # (B, L) each

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model) -> dict[str, float]:
        """Held-out token loss, and how many sampled captions follow the grammar (shapes captions only)."""
        if not self.val_captions:
            return {}
        device = next(model.parameters()).device
        total = count = 0.0
        for start in range(0, len(self.val_captions), 64):
            docs = {k: v.to(device) for k, v in encode_documents(self.tokenizer,
                                                                self.val_captions[start : start + 64]).items()}
            n = float((docs["labels"][:, 1:] != IGNORE).sum())  # tokens predicted
            total, count = total + model(**docs).loss.item() * n, count + n
        tok = self.tokenizer
        start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        prompt = torch.full((self.eval_samples, 1), start_id, dtype=torch.long, device=device)  # (S, 1)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=64,
                                 eos_token_id=tok.eos_token_id, pad_token_id=pad_id(tok))  # (S, 1 + T)
        samples = tok.batch_decode(out[:, 1:], skip_special_tokens=True)
        return {"val_loss": total / count, "sample_well_formed": float(np.mean([shapes.is_well_formed(s)
                                                                                 for s in samples]))}


@dataclass
class LMSettings:
    """What an LM pre-training run was made from; saved as lm.json next to the LM."""

    data: str  # image-caption folder; only captions.jsonl is read
    lm: str = "qwen2-shapes"  # preset (random init) or a local LM dir to continue from
    val: str | None = None
    eval_n: int = 200


def read_captions(folder: str | Path, limit: int | None = None) -> list[str]:
    """The captions of an image-caption folder, without loading its images."""
    records = read_records(Path(folder))[:limit]
    if any(r.caption is None for r in records):
        raise ValueError(f"{folder} has images without captions")
    return [r.caption for r in records]  # type: ignore[misc]


def train_lm(settings: LMSettings, cfg: TrainConfig, out: Path) -> PreTrainedModel | None:
    """Pre-train (or resume) a causal LM on caption text; returns it, or None if stopped early (re-run resumes).

    ``out`` ends up a standard checkpoint dir: ``AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)`` load it, and stage 2 takes it as its LM source.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    captions = read_captions(settings.data)
    val = read_captions(settings.val, limit=settings.eval_n) if settings.val else None
    torch.manual_seed(cfg.seed)  # same random init on resume
    lm, tokenizer = build_lm(settings.lm), load_tokenizer(settings.lm)
    atomic_write_text(out / LM_FILE, json.dumps({"settings": asdict(settings), "train": asdict(cfg)}, indent=2) + "\n")
    state = train(LMTask(lm, tokenizer, captions, val, seed=cfg.seed), cfg, out)
    if not state.done:
        return None
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return lm
