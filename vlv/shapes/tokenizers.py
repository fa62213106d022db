"""The shapes world's tokenizers: the teacher's (one CLIP token per object phrase) and the LM's (Qwen2's own BPE
pipeline over the caption words).

Full scale reads both from checkpoint dirs; the shapes world has no pretrained ones, so they are built here,
saved with the models that use them (``save_pretrained``), and read back from those dirs like any other.
"""

from __future__ import annotations

import itertools

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

from vlv.shapes import world

CLIP_SPECIAL = ["<unk>", "<bos>", "<pad>", "<eos>"]  # eos id 3: not CLIPTextModel's legacy value 2
SEPARATORS = [", ", " and "]
LM_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in the qwen2-shapes config


def build_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose words are the world's object phrases and the two separators.

    decode(encode(caption)) == caption exactly; text outside the grammar becomes <unk>.
    """
    phrases = [world.phrase(f) for f in itertools.product(world.POSITIONS, world.SHAPES, world.COLORS,
                                                             world.SIZES)]
    vocab = {tok: i for i, tok in enumerate(CLIP_SPECIAL + SEPARATORS + sorted(phrases))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(", | and "), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def caption_words() -> list[str]:
    """Every word of the shapes caption grammar (``world.caption``), commas excluded."""
    positions = dict.fromkeys(w for p in world.POSITIONS for w in p.split())  # top, left, right, bottom
    return ["a", *world.SIZES, *world.COLORS, *world.SHAPES, "at", "the", *positions, "and"]


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
    tokens = dict.fromkeys([*LM_SPECIAL, *pieces, *alphabet, *(a + b for a, b in merges)])
    return Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                          bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tokenizer_for(lm: str) -> PreTrainedTokenizerFast | None:
    """The tokenizer a command brings for an LM source: an LM dir has its own (None); a random-init LM config has
    none, and the command line's random-init LMs are the shapes world's."""
    from vlv.lm import is_lm_dir

    return None if is_lm_dir(lm) else build_shapes_tokenizer()
