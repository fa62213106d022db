"""An official stage-1 checkpoint (``SDModel`` of the official code) -> a vlv stage-1 run dir.

Accepted sources: ``checkpoint_<N>.pt`` (a dict with ``model_state_dict``, the plain strategy), a consolidated
``pytorch_model.bin`` (a plain state dict, what ``zero_to_fp32.py`` writes), or a DeepSpeed save dir holding
one. The keys, all consumed strictly:

- ``query_embed`` (1, Nq, D) -> ``queries``; ``language_proj.{0,2}.*`` -> ``phi.{0,2}.*``;
- ``model.*`` (the remote-code Florence-2) -> the native Florence-2 by :func:`vlv.official.florence2.native_key`;
  its language model trained and goes into the run dir; its DaViT and projector were frozen and must equal the
  base Florence-2 dir's (they are read from there on load); ``model.language_model.lm_head.weight`` (a frozen
  clone VLV never uses) and ``final_logits_bias`` are dropped;
- ``vae.*``, ``unet.*``, ``text_encoder.*`` (frozen SD) must equal the decoder dir's weights, then are dropped.

The run dir: ``florence2/`` (the base converted to native once, unless a native dir was given), and the
``VLVEncoder.save_pretrained`` files with the official settings (trainable = :data:`vlv.config.DEFAULT_TRAINABLE`,
image size and normalisation from the Florence processor's config, the ``<MORE_DETAILED_CAPTION>`` prompt ids).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlv.checks import check_sd_dir, require_dirs
from vlv.config import DEFAULT_TRAINABLE, EncoderConfig
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder, load_florence2
from vlv.errors import InvalidInput
from vlv.modeling import load_torch_file
from vlv.official.florence2 import convert_florence2, group_of, is_remote_dir, native_key, native_state_dict, prompt_ids

CONSOLIDATED = "pytorch_model.bin"
SD_PARTS = ("vae", "unet", "text_encoder")
LM_HEAD = "model.language_model.lm_head.weight"  # a frozen clone of the initial shared embeddings; unused
NATIVE_DIR = "florence2"


# ------------------------------------------------------------------------------------------ load
def load_stage1_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The SDModel state dict of a ``checkpoint_<N>.pt``, a ``pytorch_model.bin`` or a DeepSpeed save dir."""
    path = Path(ckpt)
    if path.is_dir():
        if not (path / CONSOLIDATED).is_file():
            raise FileNotFoundError(f"no {CONSOLIDATED} in {path}: consolidate the DeepSpeed shards first, as the "
                                    f"official inference does (python zero_to_fp32.py {path} {path})")
        path = path / CONSOLIDATED
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    data = load_torch_file(path)
    if isinstance(data, dict) and "model_state_dict" in data:
        data = data["model_state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InvalidInput(f"{path} is not an official stage-1 checkpoint (neither a state dict nor a dict with "
                           "model_state_dict)")
    return dict(data)


def sd_state(module: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
    """A frozen SD part's weights under the official code's names."""
    state = module.state_dict()
    if part == "text_encoder" and not any(k.startswith("text_model.") for k in state):
        state = {f"text_model.{k}": v for k, v in state.items()}  # transformers 5's CLIPTextModel drops the level
    return state


def check_frozen(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], name: str, decoder_dir,
                 kind: str = "stage-1") -> int:
    """A checkpoint's frozen SD part (``got``, keys under ``name.``) must be the decoder dir's (``ref``), key for
    key and value for value; one ValueError naming the first key that is not."""
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing:
        raise InvalidInput(f"missing key '{name}.{missing[0]}' in the {kind} checkpoint (the decoder dir "
                           f"{decoder_dir} has it; {len(missing)} missing in all)")
    if extra:
        raise InvalidInput(f"the decoder dir {decoder_dir} does not match the checkpoint: {name}.{extra[0]} is "
                           "not in the decoder dir")
    for k, v in got.items():
        if v.shape != ref[k].shape or not torch.equal(v.to(ref[k].dtype), ref[k]):
            raise InvalidInput(f"the decoder dir {decoder_dir} does not match the checkpoint: {name}.{k} differs "
                               "(use the base Stable Diffusion dir the official run was trained with)")
    return len(got)


def check_decoder_parts(state: dict[str, torch.Tensor], decoder: DiffusionDecoder, decoder_dir) -> dict[str, int]:
    """The checkpoint's frozen SD weights must be the decoder dir's (:func:`check_frozen`), part by part."""
    return {part: check_frozen({k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")},
                               sd_state(getattr(decoder, part), part), part, decoder_dir)
            for part in SD_PARTS}


# -------------------------------------------------------------------------------------- florence
def read_processor(florence_dir: Path) -> dict:
    """image_size, image_mean, image_std from the Florence processor's ``preprocessor_config.json``."""
    file = florence_dir / "preprocessor_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no preprocessor_config.json in {florence_dir} (it gives the image size)")
    data = json.loads(file.read_text())
    size = data.get("crop_size") if data.get("do_center_crop") else data.get("size")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not size or size.get("height") != size.get("width"):
        raise InvalidInput(f"{file}: the processor's size {size!r} is not square")
    return {"image_size": int(size["height"]), "image_mean": tuple(data.get("image_mean", (0.485, 0.456, 0.406))),
            "image_std": tuple(data.get("image_std", (0.229, 0.224, 0.225)))}


def official_encoder_config(native_dir: Path, out: Path, text_dim: int, num_queries: int) -> EncoderConfig:
    """The official stage 1's encoder: trainable set, the processor's image size and normalisation, the
    ``<MORE_DETAILED_CAPTION>`` prompt ids. A Florence-2 dir inside the run dir is named relatively, so the run
    dir can move (VLVEncoder reads it against the run dir)."""
    tok = AutoTokenizer.from_pretrained(native_dir, local_files_only=True)
    inside = native_dir.is_relative_to(out.resolve())
    return EncoderConfig(text_dim=text_dim,
                         florence2=str(native_dir.relative_to(out.resolve())) if inside else str(native_dir),
                         num_queries=num_queries, trainable=list(DEFAULT_TRAINABLE), prompt_ids=prompt_ids(tok),
                         **read_processor(native_dir))


def native_florence_dir(florence2_dir: str | Path, out: Path) -> tuple[Path, dict[str, int]]:
    """A native Florence-2 dir: ``florence2_dir`` itself when native, else converted once into ``out/florence2``."""
    src = Path(florence2_dir)
    if not is_remote_dir(src):
        return src.resolve(), {}
    return (out / NATIVE_DIR).resolve(), convert_florence2(src, out / NATIVE_DIR)


# ---------------------------------------------------------------------------------------- import
def remove_partial(out: Path, created: bool) -> None:
    """No half-made run dir is left behind on an error: ``out`` was absent or empty, so all in it is ours."""
    for child in list(out.iterdir()) if out.is_dir() else []:
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    if created:
        out.rmdir()


def encoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Counter]:
    """The checkpoint's non-SD keys -> VLVEncoder names (``queries``, ``phi.*``, ``florence.*``); strict."""
    out, counts = {}, Counter()
    florence = {}
    for key, value in state.items():
        top = key.split(".")[0]
        if top in SD_PARTS:
            continue
        if key == "query_embed":
            out["queries"] = value
            counts["queries"] += 1
        elif key.startswith(("language_proj.0.", "language_proj.2.")):
            out["phi." + key[len("language_proj."):]] = value
            counts["phi"] += 1
        elif key == LM_HEAD:
            counts["dropped"] += 1
        elif top == "model":
            florence[key[len("model."):]] = value
        else:
            raise InvalidInput(f"unexpected key {key!r} in the stage-1 checkpoint")
    for key in florence:
        try:
            name = native_key(key)
        except ValueError:
            raise InvalidInput(f"unexpected key 'model.{key}' in the stage-1 checkpoint: no Florence-2 rule maps it"
                             ) from None
        counts["dropped" if name is None else f"florence.{group_of(name)}"] += 1
    if florence:
        if "language_model.model.shared.weight" not in florence:
            raise InvalidInput("missing key 'model.language_model.model.shared.weight' in the stage-1 checkpoint")
        out.update({f"florence.{k}": v for k, v in native_state_dict(florence).items()})  # lm_head tied to shared
    return out, counts


def load_into(encoder: VLVEncoder, state: dict[str, torch.Tensor], florence_dir: Path) -> None:
    """Strict: trainable parameters are copied; frozen ones and buffers must equal the base Florence-2 dir's."""
    target = encoder.state_dict()
    missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing:
        raise InvalidInput(f"missing key {_official_name(missing[0])!r} in the stage-1 checkpoint "
                           f"({len(missing)} missing in all)")
    if extra:
        raise InvalidInput(f"unexpected key {_official_name(extra[0])!r} in the stage-1 checkpoint")
    for k, v in state.items():
        if v.shape != target[k].shape:
            raise InvalidInput(f"{_official_name(k)}: shape {tuple(v.shape)} in the checkpoint, but the encoder "
                               f"(from the Florence-2 and decoder dirs) needs {tuple(target[k].shape)}")
    # Tied names (embed_tokens, lm_head -> shared) share the trainable parameter: list every name.
    trainable = {n for n, p in encoder.named_parameters(remove_duplicate=False) if p.requires_grad}
    with torch.no_grad():
        for k, v in state.items():
            if k in trainable:
                target[k].copy_(v)
            elif not torch.equal(v.to(target[k].dtype), target[k]):
                raise InvalidInput(f"the Florence-2 dir {florence_dir} does not match the checkpoint: "
                                   f"{_official_name(k)} (frozen in stage 1) differs from the base weights")


def _official_name(name: str) -> str:
    """A vlv encoder key, named as the official checkpoint would (for errors)."""
    if name == "queries":
        return "query_embed"
    if name.startswith("phi."):
        return "language_proj." + name[4:]
    return name


def import_stage1(ckpt: str | Path, florence2_dir: str | Path, decoder_dir: str | Path, out: str | Path
                  ) -> dict[str, int]:
    """Write the vlv stage-1 run dir ``out`` from an official stage-1 checkpoint; returns counts per group.

    ``florence2_dir`` is the base Florence-2 (remote-code layout, converted into ``out/florence2``, or a native
    dir used in place); ``decoder_dir`` the base Stable Diffusion dir. ``out`` must be absent or empty.
    """
    out = Path(out)
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"no such checkpoint: {ckpt}")
    require_dirs(florence2_dir, decoder_dir)
    check_sd_dir(decoder_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty dir: refusing to overwrite it")
    state = load_stage1_state(ckpt)
    mapped, counts = encoder_state(state)  # strict on names before any work
    for key in ("queries", "phi.0.weight", "phi.2.weight"):
        if key not in mapped:
            raise InvalidInput(f"missing key {_official_name(key)!r} in the stage-1 checkpoint")
    decoder = DiffusionDecoder.from_pretrained(decoder_dir)
    checked = check_decoder_parts(state, decoder, decoder_dir)
    counts.update({f"{k} (== decoder, dropped)": n for k, n in checked.items()})

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        native_dir, _ = native_florence_dir(florence2_dir, out)
        config = official_encoder_config(native_dir, out, decoder.text_dim, int(mapped["queries"].shape[1]))
        encoder = VLVEncoder(config, load_florence2(native_dir))
        load_into(encoder, mapped, native_dir)
        encoder.save_pretrained(out)
        VLVEncoder.from_pretrained(out)  # the run dir must load strictly
    except BaseException:
        remove_partial(out, created)
        raise
    for part in ("vision_tower", "multi_modal_projector"):
        counts[f"florence.{part} (== base)"] = counts.pop(f"florence.{part}", 0)
    order = ["queries", "phi", "florence.language_model", "florence.vision_tower (== base)",
             "florence.multi_modal_projector (== base)", *(f"{p} (== decoder, dropped)" for p in SD_PARTS), "dropped"]
    return {k: counts[k] for k in order if k in counts}
