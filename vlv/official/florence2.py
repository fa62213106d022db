"""A Florence-2 dir in Microsoft's remote-code layout -> transformers' native ``Florence2ForConditionalGeneration``.

The remote-code layout (microsoft/Florence-2-large): ``config.json`` with ``auto_map``, ``pytorch_model.bin``,
the BART tokenizer files and ``preprocessor_config.json``. vlv never runs remote code, so the weights are renamed
by the rules of transformers' own conversion script
(``src/transformers/models/florence2/convert_florence2_original_pytorch_to_hf.py``), with two differences:

- the vocabulary keeps its original size (the script adds an ``<image>`` token and pads to a multiple of 64):
  every token id means what it meant, and no embedding row is invented. ``image_token_id`` is set to
  ``vocab_size``, an id no token has; vlv passes ``inputs_embeds`` and never uses the placeholder.
- the tokenizer gets the 1024 task / location tokens that the remote ``Florence2Processor`` adds when it is
  built (``<od>``, ``<loc_0..999>``, ...), so ``AutoTokenizer.from_pretrained(out)`` alone gives the official ids.

Strict: every remote key is renamed or dropped by name (``final_logits_bias``, always zero in BART; ``lm_head``,
which native ties to ``shared``), and the result must fill the native model exactly (keys and shapes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from transformers import BartConfig, BartTokenizer, Florence2Config, Florence2ForConditionalGeneration

from vlv.checks import require_dirs
from vlv.errors import InvalidInput
from vlv.modeling import load_torch_file, write_json
from vlv.progress import quiet_library

REMOTE_WEIGHTS = "pytorch_model.bin"
# Added by the remote Florence2Processor.__init__ (microsoft/Florence-2-large processing_florence2.py), in order.
PROCESSOR_TOKENS = (["<od>", "</od>", "<ocr>", "</ocr>"] + [f"<loc_{x}>" for x in range(1000)]
                    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
                       "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
                       "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"])
# The remote processor replaces a task token by its prompt text (task_prompts_without_inputs).
TASK_PROMPTS = {"<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image."}
# Remote BART flags that native BART does not have: they must hold their BART default.
LEGACY_BART = {"normalize_before": False, "add_final_layer_norm": False, "add_bias_logits": False}

_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\."
_NATIVE_BLOCK = r"model.vision_tower.blocks.\1.\2.\3."
# (remote pattern, native replacement), remote keys without the wrapper's leading "model." (spec table).
RULES = [
    (r"vision_tower\.convs\.(\d+)\.proj\.(weight|bias)", r"model.vision_tower.convs.\1.conv.\2"),
    (r"vision_tower\.convs\.(\d+)\.norm\.(weight|bias)", r"model.vision_tower.convs.\1.norm.\2"),
    (_BLOCK + r"conv([12])\.fn\.dw\.(weight|bias)", _NATIVE_BLOCK + r"conv\4.\5"),
    (_BLOCK + r"(?:window_attn|channel_attn)\.norm\.(weight|bias)", _NATIVE_BLOCK + r"norm1.\4"),
    (_BLOCK + r"(window_attn|channel_attn)\.fn\.(qkv|proj)\.(weight|bias)", _NATIVE_BLOCK + r"\4.\5.\6"),
    (_BLOCK + r"ffn\.norm\.(weight|bias)", _NATIVE_BLOCK + r"norm2.\4"),
    (_BLOCK + r"ffn\.fn\.net\.(fc[12])\.(weight|bias)", _NATIVE_BLOCK + r"ffn.\4.\5"),
    (r"image_projection", "model.multi_modal_projector.image_projection.weight"),  # transposed: [in, out] -> Linear
    (r"image_proj_norm\.(weight|bias)", r"model.multi_modal_projector.image_proj_norm.\1"),
    (r"image_pos_embed\.(row|column)_embeddings\.weight",
     r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight"),
    (r"visual_temporal_embed\.pos_idx_to_embed", "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
]
SHARED = "model.language_model.shared.weight"
TIED = ("model.language_model.encoder.embed_tokens.weight", "model.language_model.decoder.embed_tokens.weight")
REMOTE_LM_HEAD, REMOTE_FINAL_BIAS = "language_model.lm_head.weight", "language_model.final_logits_bias"
DROPPED = {REMOTE_FINAL_BIAS: "native BART has no final_logits_bias",
           REMOTE_LM_HEAD: "native ties lm_head to shared (checked equal)"}


# ----------------------------------------------------------------------------------------- config
def native_config(remote_config: dict) -> Florence2Config:
    """The remote ``config.json`` (a dict) -> a native ``Florence2Config``; ValueError on what native lacks."""
    try:
        text, vision = dict(remote_config["text_config"]), remote_config["vision_config"]
    except KeyError as e:
        raise InvalidInput(f"not a remote-code Florence-2 config: no {e.args[0]}") from None
    if "dim_embed" not in vision:
        raise InvalidInput("not a remote-code Florence-2 config: vision_config has no dim_embed "
                           "(a native config has embed_dim: use the dir as it is)")
    for key, default in LEGACY_BART.items():
        if text.get(key, default) != default:
            raise InvalidInput(f"text_config.{key}={text[key]!r}: native BART supports only {default!r}")
    fields = set(BartConfig.__dataclass_fields__)
    text = {k: v for k, v in text.items() if k in fields}  # generation settings live in generation_config.json
    sources = vision.get("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
    if list(sources) != ["spatial_avg_pool", "temporal_avg_pool"]:
        raise InvalidInput(f"vision_config.image_feature_source={sources!r}: native Florence-2 implements only "
                           "['spatial_avg_pool', 'temporal_avg_pool']")
    pos, temporal = vision.get("image_pos_embed", {}), vision.get("visual_temporal_embedding", {})
    if pos.get("type", "learned_abs_2d") != "learned_abs_2d" or temporal.get("type", "COSINE") != "COSINE":
        raise InvalidInput(f"image_pos_embed {pos!r} / visual_temporal_embedding {temporal!r}: native Florence-2 "
                           "implements learned_abs_2d and COSINE only")
    projection = vision.get("projection_dim", remote_config.get("projection_dim"))
    native_vision = {
        "model_type": "florence_vision", "embed_dim": list(vision["dim_embed"]),
        **{k: list(vision[k]) for k in ("num_heads", "num_groups", "depths", "patch_size", "patch_stride",
                                        "patch_padding", "patch_prenorm") if k in vision},
        **{k: vision[k] for k in ("window_size", "drop_path_rate") if k in vision},
        "projection_dim": projection,
        "max_position_embeddings": pos.get("max_pos_embeddings", 50),
        "max_temporal_embeddings": temporal.get("max_temporal_embeddings", 100),
    }
    vocab = text.get("vocab_size", remote_config.get("vocab_size"))
    return Florence2Config(text_config={"model_type": "bart", **text}, vision_config=native_vision,
                           image_token_id=vocab, tie_word_embeddings=True, is_encoder_decoder=True)


# ------------------------------------------------------------------------------------------ state
def native_key(remote_key: str) -> str | None:
    """The native name of a remote key (without the wrapper's ``model.``); None if dropped by name."""
    if remote_key in DROPPED:
        return None
    for pattern, repl in RULES:
        if re.fullmatch(pattern, remote_key):
            return re.sub(pattern, repl, remote_key)
    raise InvalidInput(f"unexpected key {remote_key!r} in the remote-code Florence-2 weights: no rule maps it")


def group_of(native: str) -> str:
    """``vision_tower``, ``multi_modal_projector`` or ``language_model``: the three parts of Florence-2."""
    return native.split(".")[1] if native.startswith("model.") else native.split(".")[0]


def native_state_dict(remote_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remote-code weights (keys as in its ``pytorch_model.bin``) -> the native model's full ``state_dict``.

    ``image_projection`` is transposed (a [in, out] Parameter -> a bias-free Linear's [out, in] weight); the tied
    ``shared`` / ``embed_tokens`` / ``lm_head`` must be equal (native ties them) and come out as one tensor.
    """
    native = {}
    for key, value in remote_state.items():
        name = native_key(key)
        if name is not None:
            native[name] = value.t().contiguous() if key == "image_projection" else value
    if SHARED not in native:
        raise InvalidInput("missing key 'language_model.model.shared.weight' in the remote-code Florence-2 weights")
    shared = native[SHARED]
    for name in TIED:
        if name in native and not torch.equal(native[name], shared):
            raise InvalidInput(f"{name} differs from {SHARED}: native Florence-2 ties them")
        native[name] = shared
    if REMOTE_LM_HEAD in remote_state and not torch.equal(remote_state[REMOTE_LM_HEAD], shared):
        raise InvalidInput(f"{REMOTE_LM_HEAD} differs from language_model.model.shared.weight: native Florence-2 "
                           "ties them")
    native["lm_head.weight"] = shared
    return native


def mapped_counts(remote_state: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many remote tensors went to each native part, and how many were dropped by name."""
    counts = Counter()
    for key in remote_state:
        name = native_key(key)
        counts["dropped" if name is None else group_of(name)] += 1
    order = ("vision_tower", "multi_modal_projector", "language_model", "dropped")
    return {k: counts[k] for k in order if k in counts}


def check_native_state(native: dict[str, torch.Tensor], config: Florence2Config) -> None:
    """The native keys must be exactly the model's, with its shapes: one ValueError naming the first that is not."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Florence2ForConditionalGeneration(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(native)), sorted(set(native) - set(expected))
    if missing:
        raise InvalidInput(f"missing key {missing[0]!r} for native Florence-2 ({len(missing)} missing in all)")
    if unexpected:
        raise InvalidInput(f"unexpected key {unexpected[0]!r} for native Florence-2 ({len(unexpected)} in all)")
    for k, shape in expected.items():
        if native[k].shape != shape:
            raise InvalidInput(f"{k}: shape {tuple(native[k].shape)} does not fit native Florence-2's {tuple(shape)}")


def native_model(remote_config: dict, remote_state: dict[str, torch.Tensor]) -> Florence2ForConditionalGeneration:
    """A native fp32 model holding the remote weights (strict, ties restored)."""
    config = native_config(remote_config)
    native = native_state_dict(remote_state)
    check_native_state(native, config)
    model = Florence2ForConditionalGeneration(config)
    model.load_state_dict({k: v.float() for k, v in native.items()}, strict=True)
    model.tie_weights()
    return model.float().eval()


# ------------------------------------------------------------------------------------------- dirs
def is_remote_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a remote-code Florence-2 (``auto_map`` / DaViT ``dim_embed`` in its config.json)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no Florence-2 dir at {path} (no config.json)")
    data = json.loads(config.read_text())
    return "auto_map" in data or "dim_embed" in data.get("vision_config", {})


def load_remote_tokenizer(src_dir: str | Path) -> BartTokenizer:
    """The remote dir's BART tokenizer with the tokens the remote processor adds, so ids are the official ones."""
    tok = BartTokenizer.from_pretrained(src_dir, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": PROCESSOR_TOKENS})
    return tok


def prompt_ids(tokenizer, task: str = "<MORE_DETAILED_CAPTION>") -> list[int]:
    """The official processor's ids of a task prompt: the task text, tokenised ``<s> ... </s>``."""
    text = TASK_PROMPTS.get(task, task)
    return tokenizer(tokenizer.bos_token + text + tokenizer.eos_token, add_special_tokens=False).input_ids


def _preprocessor(src: Path) -> dict:
    """The remote preprocessor_config.json without its remote-code hooks (a plain CLIPImageProcessor config)."""
    data = json.loads((src / "preprocessor_config.json").read_text())
    return {k: v for k, v in data.items() if k not in ("auto_map", "processor_class")}


def convert_florence2(src_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write a native Florence-2 checkpoint dir (safetensors, tokenizer, preprocessor and generation configs).

    Built in a temporary sibling dir and renamed into place, so ``out_dir`` is either absent or complete.
    ``out_dir`` may exist only if empty. Returns the mapped counts per part (:func:`mapped_counts`).
    """
    src, out = Path(src_dir), Path(out_dir)
    require_dirs(src)
    if not is_remote_dir(src):
        raise InvalidInput(f"{src} is not a remote-code Florence-2 dir (its config.json has no auto_map): "
                           "a native dir needs no conversion")
    if not (src / REMOTE_WEIGHTS).is_file():
        raise FileNotFoundError(f"no {REMOTE_WEIGHTS} in {src}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty dir: refusing to overwrite it")
    remote_config = json.loads((src / "config.json").read_text())
    remote_state = load_torch_file(src / REMOTE_WEIGHTS)
    counts = mapped_counts(remote_state)
    model = native_model(remote_config, remote_state)
    tok = load_remote_tokenizer(src)
    if len(tok) > model.config.text_config.vocab_size:
        raise InvalidInput(f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary "
                           f"({model.config.text_config.vocab_size})")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with quiet_library():
        model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if (src / "preprocessor_config.json").is_file():
        write_json(tmp / "preprocessor_config.json", _preprocessor(src))
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return counts
