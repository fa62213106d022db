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
the official image transform: the run's ``--image_size`` crop, then the image size and normalisation of the
Florence processor's config; the ``<MORE_DETAILED_CAPTION>`` prompt ids).

Mixed precision saves every tensor cast (bf16 under ``--mixed_precision bf16``), frozen ones included: a frozen
tensor then equals its base rounded to that dtype (:func:`same_as_base`; any other difference is refused), and the
encoder records the dtype (``frozen_dtype``) so it computes with the frozen weights the checkpoint holds. The
trained weights are written in the dtype asked for (fp32 by default).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlv.checks import check_sd_dir, require_dirs
from vlv.config import DEFAULT_TRAINABLE, EncoderConfig
from vlv.decoder import DiffusionDecoder
from vlv.decoders import SD2, family_of
from vlv.encoder import VLVEncoder, load_florence2
from vlv.errors import InvalidInput
from vlv.modeling import load_torch_file
from vlv.official.florence2 import convert_florence2, group_of, is_remote_dir, native_key, native_state_dict, prompt_ids

CONSOLIDATED = "pytorch_model.bin"
SD_PARTS = ("vae", "unet", "text_encoder")
LM_HEAD = "model.language_model.lm_head.weight"  # a frozen clone of the initial shared embeddings; unused
NATIVE_DIR = "florence2"


# The official code saves float32, or, under mixed precision, everything cast to bfloat16 / float16.
SAVED_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a run dir's trained weights


@dataclass
class Imported:
    """What an import read and wrote: tensors per group (each key of the checkpoint once), the checkpoint's dtypes
    (name -> count), the dtype its frozen parts were saved in when lower than the bases' (None: the bases' own),
    and the dtype the trained weights were written in."""

    counts: dict[str, int]
    dtypes: dict[str, int]
    frozen_dtype: str | None
    written: str
    note: str = ""  # what else a reader of the line should know

    def dtype_line(self) -> str:
        """One line: the dtype found, what the import did about it, and what it wrote."""
        found = (f"{next(iter(self.dtypes))} (all {sum(self.dtypes.values())} tensors)" if len(self.dtypes) == 1
                 else ", ".join(f"{name} ({n} tensors)" for name, n in self.dtypes.items()))
        rounded = (f"; frozen parts = the base dirs' rounded to {self.frozen_dtype}, used so"
                   if self.frozen_dtype else "")
        return f"checkpoint dtype: {found}{rounded}; trained weights written in {self.written}{self.note}"


# ------------------------------------------------------------------------------------------ dtypes
def dtype_counts(state: dict[str, torch.Tensor], kind: str) -> dict[str, int]:
    """How many tensors of each dtype the checkpoint holds; a dtype the official code never saves is refused."""
    counts = Counter()
    for key, value in state.items():
        if value.dtype not in SAVED_DTYPES:
            raise InvalidInput(f"{key}: dtype {str(value.dtype).removeprefix('torch.')} in the {kind} checkpoint "
                               f"(the official code saves {', '.join(SAVED_DTYPES.values())})")
        counts[SAVED_DTYPES[value.dtype]] += 1
    return dict(counts.most_common())


def same_as_base(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """A frozen tensor of the checkpoint is the base's: equal, or, saved in a lower precision (mixed precision casts
    the frozen parts too), equal to the base rounded to it. Any other difference, one ulp included, is not."""
    if got.shape != ref.shape:
        return False
    if got.dtype.itemsize < ref.dtype.itemsize:
        return torch.equal(ref.to(got.dtype), got)
    return torch.equal(got.to(ref.dtype), ref)


def frozen_dtype(tensors: dict[str, torch.Tensor], what: str) -> str | None:
    """The dtype a frozen part was saved in, when lower than float32 (the dtype vlv loads every base in); one per
    part, since mixed precision casts whole models (vlv rounds the part to it on load)."""
    dtypes = {v.dtype for v in tensors.values()}
    if dtypes <= {torch.float32}:
        return None
    if len(dtypes) > 1:
        names = ", ".join(sorted(SAVED_DTYPES[d] for d in dtypes))
        raise InvalidInput(f"the frozen {what} weights are saved in several dtypes ({names}): vlv rounds a frozen "
                           "part to one dtype")
    return SAVED_DTYPES[dtypes.pop()]


@torch.no_grad()
def write_trained_as(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The trainable parameters cast in place to ``dtype``, what ``save_pretrained`` then writes; frozen ones stay.
    A value the dtype cannot hold (fp16 overflows where bf16 does not) is refused."""
    for name, p in module.named_parameters():
        if p.requires_grad and p.dtype != dtype:
            cast = p.data.to(dtype)
            if not torch.equal(torch.isfinite(cast), torch.isfinite(p.data)):
                raise InvalidInput(f"{name} does not fit {SAVED_DTYPES[dtype]}: write the run in fp32 or bf16")
            p.data = cast


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype {dtype!r}: choose {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
        if not same_as_base(v, ref[k]):
            raise InvalidInput(f"the decoder dir {decoder_dir} does not match the checkpoint: {name}.{k} differs"
                               f"{_rounded(v, ref[k])} (use the base Stable Diffusion dir the official run was "
                               "trained with)")
    return len(got)


def _rounded(got: torch.Tensor, ref: torch.Tensor) -> str:
    lower = got.dtype.itemsize < ref.dtype.itemsize
    return f" even rounded to the checkpoint's {SAVED_DTYPES[got.dtype]}" if lower else ""


def check_sd2(decoder_dir: str | Path) -> None:
    """The official code distils SD 2.1-base: its checkpoints pair with an SD 2.x dir only."""
    family = family_of(decoder_dir) if (Path(decoder_dir) / "model_index.json").is_file() else SD2
    if family is not SD2:
        raise InvalidInput(f"--decoder {decoder_dir} is an {family.name} dir; the official checkpoints distil "
                           "Stable Diffusion 2.1-base: give its dir")


def check_decoder_parts(state: dict[str, torch.Tensor], decoder: DiffusionDecoder, decoder_dir) -> dict[str, int]:
    """The checkpoint's frozen SD weights must be the decoder dir's (:func:`check_frozen`), part by part."""
    return {part: check_frozen({k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")},
                               sd_state(getattr(decoder, part), part), part, decoder_dir)
            for part in SD_PARTS}


# -------------------------------------------------------------------------------------- florence
# What the official transform implements of CLIPImageProcessor (Florence-2-large's preprocessor_config.json).
PROCESSOR = {"do_resize": True, "resample": 3, "do_rescale": True, "do_normalize": True, "do_center_crop": False}


def read_processor(florence_dir: Path) -> dict:
    """image_size, image_mean, image_std from the Florence processor's ``preprocessor_config.json``; a processor
    that does other than resize (PIL bicubic), rescale by 1/255 and normalise is refused."""
    file = florence_dir / "preprocessor_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no preprocessor_config.json in {florence_dir} (it gives the image size)")
    data = json.loads(file.read_text())
    for key, value in PROCESSOR.items():
        if data.get(key, value) != value:
            raise InvalidInput(f"{file}: {key}={data[key]!r}; vlv's official transform implements {key}={value!r}")
    if abs(data.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise InvalidInput(f"{file}: rescale_factor={data['rescale_factor']!r}; vlv's official transform "
                           "rescales by 1/255")
    size = data.get("size")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not size or size.get("height") != size.get("width"):
        raise InvalidInput(f"{file}: the processor's size {size!r} is not square")
    return {"image_size": int(size["height"]), "image_mean": tuple(data.get("image_mean", (0.485, 0.456, 0.406))),
            "image_std": tuple(data.get("image_std", (0.229, 0.224, 0.225)))}


def official_encoder_config(native_dir: Path, out: Path, text_dim: int, num_queries: int, crop_size: int
                            ) -> EncoderConfig:
    """The official stage 1's encoder: trainable set, the official transform (``crop_size``, the run's
    ``--image_size``, then the processor's image size and normalisation), the ``<MORE_DETAILED_CAPTION>`` prompt
    ids. A Florence-2 dir inside the run dir is named relatively, so the run dir can move (VLVEncoder reads it
    against the run dir)."""
    tok = AutoTokenizer.from_pretrained(native_dir, local_files_only=True)
    inside = native_dir.is_relative_to(out.resolve())
    return EncoderConfig(text_dim=text_dim,
                         florence2=str(native_dir.relative_to(out.resolve())) if inside else str(native_dir),
                         num_queries=num_queries, trainable=list(DEFAULT_TRAINABLE), prompt_ids=prompt_ids(tok),
                         transform="official", crop_size=crop_size, **read_processor(native_dir))


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
            elif not same_as_base(v, target[k]):  # the encoder rounded its frozen weights as the checkpoint did
                raise InvalidInput(f"the Florence-2 dir {florence_dir} does not match the checkpoint: "
                                   f"{_official_name(k)} (frozen in stage 1) differs from the base weights")


def official_encoder(config: EncoderConfig, florence_dir: Path, state: dict[str, torch.Tensor], where: str
                     ) -> VLVEncoder:
    """The encoder of ``config`` on the base Florence-2, holding the checkpoint's weights (strict,
    :func:`load_into`); frozen weights the checkpoint saved rounded (mixed precision) are rounded alike, and the
    config records it (``frozen_dtype``), so the run dir reloads to the same values."""
    encoder = VLVEncoder(config, load_florence2(florence_dir))
    trainable = {n for n, p in encoder.named_parameters(remove_duplicate=False) if p.requires_grad}
    names = set(encoder.state_dict())
    frozen = {k: v for k, v in state.items() if k not in trainable and k in names}
    dtype = frozen_dtype(frozen, f"Florence-2 (in {where})")
    if dtype is not None:
        encoder = VLVEncoder(replace(config, frozen_dtype=dtype), encoder.florence)  # rounds the frozen weights
    load_into(encoder, state, florence_dir)
    return encoder


def _official_name(name: str) -> str:
    """A vlv encoder key, named as the official checkpoint would (for errors)."""
    if name == "queries":
        return "query_embed"
    if name.startswith("phi."):
        return "language_proj." + name[4:]
    return name


def import_stage1(ckpt: str | Path, florence2_dir: str | Path, decoder_dir: str | Path, out: str | Path,
                  crop_size: int = 384, dtype: str = "fp32") -> Imported:
    """Write the vlv stage-1 run dir ``out`` from an official stage-1 checkpoint; returns what was mapped.

    ``florence2_dir`` is the base Florence-2 (remote-code layout, converted into ``out/florence2``, or a native
    dir used in place); ``decoder_dir`` the base Stable Diffusion dir. ``crop_size`` is the official run's
    ``--image_size`` (the encoder keeps the official transform: that crop, then Florence-2's processor); ``dtype``
    (fp32, bf16, fp16) the one the trained weights are written in. ``out`` must be absent or empty.
    """
    out = Path(out)
    written = check_dtype(dtype)
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"no such checkpoint: {ckpt}")
    require_dirs(florence2_dir, decoder_dir)
    check_sd_dir(decoder_dir)
    check_sd2(decoder_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty dir: refusing to overwrite it")
    state = load_stage1_state(ckpt)
    dtypes = dtype_counts(state, "stage-1")
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
        config = official_encoder_config(native_dir, out, decoder.text_dim, int(mapped["queries"].shape[1]),
                                         crop_size)
        encoder = official_encoder(config, native_dir, mapped, Path(ckpt).name)
        write_trained_as(encoder, written)
        encoder.save_pretrained(out)
        VLVEncoder.from_pretrained(out)  # the run dir must load strictly
    except BaseException:
        remove_partial(out, created)
        raise
    for part in ("vision_tower", "multi_modal_projector"):
        counts[f"florence.{part} (== base)"] = counts.pop(f"florence.{part}", 0)
    order = ["queries", "phi", "florence.language_model", "florence.vision_tower (== base)",
             "florence.multi_modal_projector (== base)", *(f"{p} (== decoder, dropped)" for p in SD_PARTS), "dropped"]
    sd_rounded = {SAVED_DTYPES[v.dtype] for k, v in state.items() if k.split(".")[0] in SD_PARTS
                  and v.dtype != torch.float32}
    note = (f"; the SD parts matched --decoder rounded to {', '.join(sorted(sd_rounded))}, and vlv's decoder "
            "computes with --decoder's own weights" if sd_rounded else "")
    return Imported({k: counts[k] for k in order if k in counts}, dtypes, encoder.config.frozen_dtype,
                    SAVED_DTYPES[written], note)
