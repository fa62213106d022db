"""An official stage-2 checkpoint (``model.pt`` of the official ``CLIPDecoder``) -> a vlv stage-2 run dir.

``model.pt`` is a plain state dict (keys may carry DDP's ``module.`` prefix, stripped as the official
``handle_module_prefix`` does). Its keys, all consumed strictly:

- ``qwen2_model.*`` -> the captioner's LLM (``lm.*``), a causal LM with ``lm_dir``'s architecture; keys and
  shapes must be exactly the LM's. ``lm_head.weight`` is tied to ``embed_tokens`` when ``lm_dir``'s config ties
  them (Qwen2.5-3B does): it must then equal ``embed_tokens`` and is dropped;
- ``mlp.layers.{0,2}.*`` -> psi ``{0,2}``: Linear(d_T, d_LM), GELU, Linear(d_LM, d_LM);
- ``VLV_model.{query_embed, language_proj.*, model.*}`` -> a vlv stage-1 encoder, by the stage-1 importer's rules
  (:func:`vlv.official.stage1.encoder_state`): the Florence language model trained further in stage 2, so these
  weights (not a stage-1 file's) make the encoder; its DaViT and projector must equal the base Florence-2 dir's;
- ``VLV_model.text_encoder.*`` (frozen T) must equal ``decoder_dir``'s text encoder (rounded to the checkpoint's
  dtype when saved in bf16 / fp16: the captioner then records ``text_encoder_dtype`` and rounds T alike on load),
  then is dropped.
  Stage 2 deletes the VAE and UNet: a ``VLV_model.vae`` / ``VLV_model.unet`` key is unexpected.

The run dir ``out``: ``encoder/`` (a stage-1 run dir, with the base Florence-2 converted to native inside it unless
a native dir was given) and the ``Captioner.save_pretrained`` files, with the official settings (trainable level
``mlp+llm+encoder``, 4 beams, 300 new tokens, and ``postprocess='official'``: the official model never learned
EOS, so its captions are cut after the last '.' and repeated sentences dropped). ``captioner.json`` names T
(``decoder_dir``), the encoder (``out/encoder``) and the LM (``lm_dir``: architecture and tokenizer) by absolute
path, so ``Captioner.from_pretrained(out)`` needs no other argument.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vlv.captioner import Captioner
from vlv.checks import check_text_encoder_dir, require_dirs
from vlv.config import CaptionerConfig
from vlv.encoder import VLVEncoder
from vlv.errors import InvalidInput
from vlv.lm import build_lm, load_tokenizer
from vlv.modeling import load_torch_file
from vlv.official.stage1 import (
    SAVED_DTYPES,
    Imported,
    check_dtype,
    check_frozen,
    check_sd2,
    dtype_counts,
    encoder_state,
    frozen_dtype,
    native_florence_dir,
    official_encoder,
    official_encoder_config,
    remove_partial,
    sd_state,
    write_trained_as,
)
from vlv.text_encoder import load_text_encoder

MODULE = "module."  # DDP's wrapper prefix
LM, PSI, VLV = "qwen2_model.", "mlp.layers.", "VLV_model."
PSI_KEYS = tuple(f"{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
ENCODER_PARTS = ("query_embed", "language_proj", "model")  # VLV_model.* that make the stage-1 encoder
TEXT_ENCODER = "text_encoder"  # VLV_model.text_encoder.*: frozen T, checked against the decoder dir
ENCODER_DIR = "encoder"
# The official decoding (Caption_inference.py defaults) and its text clean-up (process_caption).
OFFICIAL_DECODING = {"num_beams": 4, "max_new_tokens": 300, "postprocess": "official"}


# ------------------------------------------------------------------------------------------ load
def load_stage2_state(model_pt: str | Path) -> dict[str, torch.Tensor]:
    """The CLIPDecoder state dict of ``model.pt``, the ``module.`` prefix stripped."""
    path = Path(model_pt)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    data = load_torch_file(path)
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InvalidInput(f"{path} is not an official stage-2 checkpoint (a plain state dict of CLIPDecoder)")
    state = {}
    for key, value in data.items():
        name = key[len(MODULE):] if key.startswith(MODULE) else key
        if name in state:
            raise InvalidInput(f"{path}: key {name!r} appears both with and without the {MODULE!r} prefix")
        state[name] = value
    return state


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict]:
    """CLIPDecoder keys -> (LLM, psi, stage-1-named encoder, text encoder) states, each without its prefix.

    Strict on names: a key outside these four groups is a ValueError naming it.
    """
    lm, psi, encoder, text = {}, {}, {}, {}
    for key, value in state.items():
        if key.startswith(LM):
            lm[key[len(LM):]] = value
        elif key.startswith(PSI) and key[len(PSI):] in PSI_KEYS:
            psi[key[len(PSI):]] = value
        elif key.startswith(VLV) and key[len(VLV):].split(".")[0] in ENCODER_PARTS:
            encoder[key[len(VLV):]] = value
        elif key.startswith(VLV + TEXT_ENCODER + "."):
            text[key[len(VLV + TEXT_ENCODER) + 1:]] = value
        else:
            raise InvalidInput(f"unexpected key {key!r} in the stage-2 checkpoint (CLIPDecoder holds qwen2_model.*, "
                               f"mlp.layers.{{0,2}}.*, VLV_model.{{query_embed,language_proj,model,text_encoder}}.*)")
    for k in PSI_KEYS:
        if k not in psi:
            raise InvalidInput(f"missing key '{PSI}{k}' in the stage-2 checkpoint")
    for group, part in ((lm, LM), (text, VLV + TEXT_ENCODER + ".")):
        if not group:
            raise InvalidInput(f"missing keys '{part}*' in the stage-2 checkpoint")
    return lm, psi, encoder, text


# -------------------------------------------------------------------------------------------- llm
def lm_architecture(lm_dir: Path):
    """``lm_dir``'s causal LM, built on the meta device (no weights): its keys, shapes and whether lm_head is tied."""
    if not (lm_dir / "config.json").is_file():
        raise FileNotFoundError(f"no causal LM at {lm_dir} (no config.json)")
    config = AutoConfig.from_pretrained(lm_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {k: v.shape for k, v in model.state_dict().items()}, tied, model.config


def check_lm_state(state: dict[str, torch.Tensor], lm_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Strict key / shape check against ``lm_dir``'s architecture; returns the state without a tied lm_head
    (checked equal to embed_tokens) and how many keys were dropped."""
    expected, tied, config = lm_architecture(lm_dir)
    dropped = 0
    state = dict(state)
    if tied:
        head, embed = "lm_head.weight", "model.embed_tokens.weight"
        if head in state:
            if embed in state and (state[head].shape != state[embed].shape
                                   or not torch.equal(state[head], state[embed])):
                raise InvalidInput(f"{LM}{head} differs from {LM}{embed}, but {lm_dir}'s config ties them "
                                   "(tie_word_embeddings): the LM dir does not match the checkpoint")
            del state[head]
            dropped = 1
        expected = {k: v for k, v in expected.items() if k != head}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise InvalidInput(f"missing key '{LM}{missing[0]}' in the stage-2 checkpoint for the LM of {lm_dir} "
                           f"({config.model_type}, {len(missing)} missing in all): the LM dir does not match")
    if extra:
        raise InvalidInput(f"unexpected key '{LM}{extra[0]}' in the stage-2 checkpoint: the LM of {lm_dir} "
                           f"({config.model_type}) has no such weight ({len(extra)} in all)")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise InvalidInput(f"{LM}{k}: shape {tuple(state[k].shape)} in the checkpoint, but the LM of {lm_dir} "
                               f"needs {tuple(shape)}: the LM dir does not match")
    return state, dropped


def check_psi(psi: dict[str, torch.Tensor], d_t: int, d_lm: int) -> None:
    shapes = {"0.weight": (d_lm, d_t), "0.bias": (d_lm,), "2.weight": (d_lm, d_lm), "2.bias": (d_lm,)}
    for k, shape in shapes.items():
        if tuple(psi[k].shape) != shape:
            raise InvalidInput(f"{PSI}{k}: shape {tuple(psi[k].shape)} in the checkpoint, but psi from d_T = {d_t} "
                               f"(the decoder's text encoder) to d_LM = {d_lm} (the LM) needs {shape}")


# ----------------------------------------------------------------------------------- text encoder
def check_text_encoder(got: dict[str, torch.Tensor], text_encoder, decoder_dir) -> int:
    """``VLV_model.text_encoder.*`` must be the decoder dir's text encoder, key for key and value for value."""
    return check_frozen(got, sd_state(text_encoder, "text_encoder"), f"{VLV}{TEXT_ENCODER}", decoder_dir, "stage-2")


# ---------------------------------------------------------------------------------------- import
def _encoder(state: dict[str, torch.Tensor], florence2_dir, text_dim: int, out: Path, where: str,
             crop_size: int) -> VLVEncoder:
    """The stage-1 encoder from ``VLV_model.*`` (stage-1 names), holding the checkpoint's weights."""
    out.mkdir()
    native_dir, _ = native_florence_dir(florence2_dir, out)
    config = official_encoder_config(native_dir, out, text_dim, int(state["queries"].shape[1]), crop_size)
    try:
        return official_encoder(config, native_dir, state, f"VLV_model. of {where}")
    except ValueError as e:  # named by the dir the caller gave, not the converted copy (removed on error)
        raise InvalidInput(_stage2_message(e, where).replace(str(native_dir), str(florence2_dir))) from None


def _stage2_message(error: ValueError, where: str) -> str:
    """A stage-1 importer message, said of the stage-2 checkpoint (its keys live under ``VLV_model.``)."""
    return str(error).replace("in the stage-1 checkpoint", f"under VLV_model. in {where}").replace(
        "in the checkpoint", f"under VLV_model. in {where}")


def import_stage2(model_pt: str | Path, florence2_dir: str | Path, decoder_dir: str | Path, lm_dir: str | Path,
                  out: str | Path, crop_size: int = 384, dtype: str = "fp32") -> Imported:
    """Write the vlv stage-2 run dir ``out`` from an official stage-2 ``model.pt``; returns what was mapped.

    ``florence2_dir`` is the base Florence-2 (remote-code layout, converted into ``out/encoder/florence2``, or a
    native dir used in place), ``decoder_dir`` the base Stable Diffusion dir (its text encoder is T), ``lm_dir``
    the base LLM dir (architecture and tokenizer; every LLM weight comes from the checkpoint). ``crop_size`` is the
    official ``--image_size`` (the encoder keeps the official transform), ``dtype`` (fp32, bf16, fp16) the one the
    trained weights are written in. A checkpoint saved under ``--mixed_precision bf16`` (every tensor bf16) is
    accepted: its frozen T, DaViT and projector must be the base dirs' rounded to bf16, and the run computes with
    them so rounded, as the official inference does. ``out`` must be absent or empty; nothing half-made is left
    behind on an error.
    """
    out = Path(out)
    written = check_dtype(dtype)
    if not Path(model_pt).exists():
        raise FileNotFoundError(f"no such checkpoint: {model_pt}")
    require_dirs(florence2_dir, decoder_dir, lm_dir)
    check_text_encoder_dir(decoder_dir)  # T is all stage 2 reads of the decoder
    check_sd2(decoder_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty dir: refusing to overwrite it")
    decoder_dir, lm_dir = Path(decoder_dir).resolve(), Path(lm_dir).resolve()
    where = Path(model_pt).name
    state = load_stage2_state(model_pt)
    dtypes = dtype_counts(state, "stage-2")
    lm_state, psi, vlv_state, text_state = split_state(state)  # strict on names before any work
    try:
        mapped, counts = encoder_state(vlv_state)
    except ValueError as e:
        raise InvalidInput(_stage2_message(e, where)) from None
    for key, official in (("queries", "query_embed"), ("phi.0.weight", "language_proj.0.weight"),
                          ("phi.2.weight", "language_proj.2.weight")):
        if key not in mapped:
            raise InvalidInput(f"missing key '{VLV}{official}' in the stage-2 checkpoint")
    lm_state, lm_dropped = check_lm_state(lm_state, lm_dir)
    text_encoder = load_text_encoder(decoder_dir)
    d_t = text_encoder.config.hidden_size
    check_psi(psi, d_t, AutoConfig.from_pretrained(lm_dir, local_files_only=True).hidden_size)
    counts["text_encoder (== decoder, dropped)"] = check_text_encoder(text_state, text_encoder, decoder_dir)
    t_dtype = frozen_dtype(text_state, f"{VLV}{TEXT_ENCODER}")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        encoder = _encoder(mapped, florence2_dir, d_t, out / ENCODER_DIR, where, crop_size)
        write_trained_as(encoder, written)
        encoder.save_pretrained(out / ENCODER_DIR)  # now: the captioner re-freezes its queries and phi
        lm = build_lm(str(lm_dir))
        full = dict(lm_state)
        if lm_dropped:  # the tied lm_head is embed_tokens itself (checked equal)
            full["lm_head.weight"] = full["model.embed_tokens.weight"]
        lm.load_state_dict(full, strict=True)
        config = CaptionerConfig(text_dim=d_t, lm=str(lm_dir), trainable="mlp+llm+encoder",
                                 text_encoder=str(decoder_dir), encoder=ENCODER_DIR,  # inside the run, relatively
                                 text_encoder_dtype=t_dtype, **OFFICIAL_DECODING)
        captioner = Captioner(config, text_encoder, encoder, lm=lm, tokenizer=load_tokenizer(str(lm_dir)))
        captioner.psi.load_state_dict({k: v.to(torch.float32) for k, v in psi.items()}, strict=True)
        write_trained_as(captioner, written)
        captioner.save_pretrained(out)
        _check_saved(out, captioner)
    except BaseException:
        remove_partial(out, created)
        raise
    for part in ("vision_tower", "multi_modal_projector"):
        counts[f"florence.{part} (== base)"] = counts.pop(f"florence.{part}", 0)
    counts = Counter({"llm": len(lm_state), "llm lm_head (tied, dropped)": lm_dropped, "psi": len(psi), **counts})
    order = ["llm", "llm lm_head (tied, dropped)", "psi", "queries", "phi", "florence.language_model",
             "florence.vision_tower (== base)", "florence.multi_modal_projector (== base)",
             "text_encoder (== decoder, dropped)", "dropped"]
    rounded = {d for d in (t_dtype, encoder.config.frozen_dtype) if d}
    return Imported({k: counts[k] for k in order if counts.get(k)}, dtypes,
                    ", ".join(sorted(rounded)) or None, SAVED_DTYPES[written])


def _check_saved(out: Path, captioner: Captioner) -> None:
    """The run dir must load alone (strict) and hold the imported weights exactly."""
    loaded = Captioner.from_pretrained(out)
    ours, theirs = captioner.state_dict(), loaded.state_dict()  # theirs in fp32: ours written in the dtype asked
    if set(ours) != set(theirs) or any(not torch.equal(v.to(theirs[k].dtype), theirs[k]) for k, v in ours.items()):
        raise RuntimeError(f"{out}: the saved captioner does not reload to the imported weights")
