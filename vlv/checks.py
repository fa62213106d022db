"""Checks of what a user hands vlv (dirs, weights files, output paths), made before any model loads.

Each reads only what it must: JSON configs, and a safetensors file's header (``safe_open`` maps the file and
parses the header, which also checks the file is as long as the header says), never the tensors. No torch is
imported, so a command refuses a bad input in a moment, with one line that names it.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from vlv.decoders import family_of
from vlv.errors import InvalidInput, UserError

WEIGHTS_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone; InvalidInput naming a torn or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="np") as f:
            return list(f.keys())
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError derives from Exception only
        if path.is_file() and path.stat().st_size == 0:
            reason = "an empty file"
        else:
            reason = f"{e}".removeprefix("Error while deserializing header: ")
        raise InvalidInput(f"{path}: not a readable safetensors file ({reason}): torn by a kill, or another "
                           "format renamed") from None


def check_safetensors(path: str | Path, keys: Iterable[str] = ()) -> list[str]:
    """A readable safetensors file holding at least ``keys``; returns all its keys."""
    found = safetensors_keys(path)
    missing = sorted(set(keys) - set(found))
    if missing:
        raise InvalidInput(f"{path}: lacks {len(missing)} expected tensor(s), first {missing[0]!r}")
    return found


def check_weights_in(folder: str | Path) -> None:
    """Every safetensors file directly in ``folder`` reads."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        safetensors_keys(f)


def _json(path: Path, keys: Iterable[str] = ()) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: not a JSON object")
    missing = [k for k in keys if not isinstance(data.get(k), dict)]
    if missing:
        raise InvalidInput(f"{path}: not the file vlv wrote (no {missing[0]!r} section)")
    return data


def check_sd_dir(path: str | Path) -> Path:
    """A complete Stable-Diffusion-layout dir: model_index.json and each part vlv loads, its weights readable.

    Why here: diffusers finds a missing part only while loading the others, and reports it in a traceback.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such Stable Diffusion dir: {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a Stable Diffusion dir (no model_index.json)")
    listed = _json(index)
    family = family_of(path)  # a family vlv does not take: one line naming it
    parts = {part: _part_marker(part, family) for part in family.parts}
    for part, marker in parts.items():
        folder = path / part
        if not isinstance(listed.get(part), list) or not folder.is_dir():
            raise InvalidInput(f"{path} is an incomplete Stable Diffusion dir: no {part}/ "
                               f"(it needs {', '.join(p + '/' for p in parts)})")
        if marker and not (folder / marker).is_file():
            raise InvalidInput(f"{path} is an incomplete Stable Diffusion dir: no {part}/{marker}")
        if part in family.tokenizers and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise InvalidInput(f"{path} is an incomplete Stable Diffusion dir: no tokenizer files in {part}/")
        if marker == "config.json":
            if not any(f.suffix in WEIGHTS_SUFFIXES for f in folder.iterdir()):
                raise InvalidInput(f"{path} is an incomplete Stable Diffusion dir: no weights in {part}/")
            check_weights_in(folder)
    return path


def _part_marker(part: str, family) -> str | None:
    """The file a part of a family's dir cannot do without (tokenizers: any of TOKENIZER_FILES)."""
    if part in family.tokenizers:
        return None
    return "scheduler_config.json" if part == "scheduler" else "config.json"


def check_text_encoder_dir(sd_dir: str | Path) -> Path:
    """A Stable-Diffusion-layout dir whose text encoder T reads: all a captioner takes from a decoder."""
    path, folder = Path(sd_dir), Path(sd_dir) / "text_encoder"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no text encoder (no text_encoder/config.json)")
    check_weights_in(folder)
    return path


def same_text_encoder(a: str | Path, b: str | Path) -> bool:
    """Whether two diffusers dirs hold the same text encoder T (SD3: both CLIPs): the same dir, or T's configs (their
    model fields) and weight files equal byte for byte (a copy). Only T matters to stage 2; reads the files only
    when the dirs differ."""
    import filecmp

    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    names_a, names_b = (family_of(d).text_encoders if (d / "model_index.json").is_file() else ("text_encoder",)
                        for d in (a, b))
    if names_a != names_b:
        return False

    def fields(folder: Path) -> dict:
        return {k: v for k, v in _json(folder / "config.json").items() if not k.startswith("_")
                and k not in ("transformers_version", "architectures", "torch_dtype", "dtype")}

    def same(ta: Path, tb: Path) -> bool:
        weights = sorted(f.name for f in ta.iterdir() if f.suffix in WEIGHTS_SUFFIXES)
        if fields(ta) != fields(tb) or weights != sorted(f.name for f in tb.iterdir()
                                                         if f.suffix in WEIGHTS_SUFFIXES):
            return False
        return all(filecmp.cmp(ta / f, tb / f, shallow=False) for f in weights)

    return all(same(a / name, b / name) for name in names_a)


def check_native_florence2(path: str | Path) -> Path:
    """A Florence-2 dir vlv can load: transformers' native layout. The remote-code layout (microsoft/Florence-2-large
    as downloaded: ``auto_map`` and a DaViT config in its config.json) would parse into a wrong-sized random
    encoder, so it is refused in one line naming the converter."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        return path  # the loader names what is missing
    data = _json(config)
    vision = data.get("vision_config") or {}
    if "auto_map" in data or "dim_embed" in vision or vision.get("model_type") == "davit":
        raise InvalidInput(f"{path} is a remote-code Florence-2 dir (config.json with auto_map, as downloaded from "
                           f"the hub); vlv runs no remote code: convert it once with `vlv import-official florence2 "
                           f"{path} --out DIR` and pass DIR")
    return path


def _text_configs(sd_dir: str | Path) -> list[dict]:
    """The configs of the text encoders z goes through (SD 2.x: one; SD3: both CLIPs, z's channels split)."""
    names = family_of(sd_dir).text_encoders if (Path(sd_dir) / "model_index.json").is_file() else ("text_encoder",)
    return [_json(Path(sd_dir) / name / "config.json") for name in names]


def text_length(sd_dir: str | Path) -> int:
    """How many positions the decoder's text encoder(s) have: the most embeddings z may hold (Nq)."""
    return min(int(c.get("max_position_embeddings", 77)) for c in _text_configs(sd_dir))


def text_width(sd_dir: str | Path) -> int:
    """d_T, the width z must have, read from the text encoders' configs (no model is built): their widths
    summed, as z's channels are split among them (a T5 config names its width d_model)."""
    return sum(int(c["hidden_size"] if "hidden_size" in c else c["d_model"]) for c in _text_configs(sd_dir))  # T5


def read_json(path: str | Path, keys: Iterable[str] = ()) -> dict:
    """A JSON object file a user handed in (a config, a run dir's record), holding the object sections ``keys``, or
    one line naming what is wrong: every run-dir JSON vlv reads comes through here."""
    return _json(Path(path), keys)


def check_text_width(z_width: int, sd_dir: str | Path, encoder: str | Path, decoder: str | Path) -> None:
    """z goes through the decoder's text encoder T, so its width must be T's: checked from the configs, before a
    weight loads (else a shape mismatch deep in a forward)."""
    width = text_width(sd_dir)
    if width != z_width:
        raise InvalidInput(f"--decoder {decoder}: its text encoder takes {width}-wide embeddings, but the encoder "
                           f"{encoder} emits z {z_width} wide; pair the encoder with the decoder it was trained for")


def _torch_archive(path: Path) -> None:
    """A ``torch.save`` file is a zip whose directory sits at its end: a torn one fails here, unread."""
    try:
        with zipfile.ZipFile(path):
            pass
    except zipfile.BadZipFile as e:
        raise InvalidInput(f"{path}: not a readable torch.save file ({e})") from None


def check_checkpoints(run: str | Path) -> None:
    """A run dir's resume checkpoints (``checkpoint/``, and a teacher's per phase) read, or one line says what to do.

    A checkpoint is swapped in by renames, so a torn one means the disk lost data, or it was copied in part.
    """
    run = Path(run)
    for ckpt in (*run.glob("checkpoint"), *run.glob("*/checkpoint"), *run.glob("*/*/checkpoint")):
        try:
            _json(ckpt / "trainer.json")
            for f in sorted(ckpt.glob("*.safetensors")):
                safetensors_keys(f)
            for f in sorted(ckpt.glob("*.pt")):  # the optimizer state
                _torch_archive(f)
        except (UserError, OSError) as e:
            raise InvalidInput(f"cannot resume from {ckpt}: it is unreadable ({e}); delete it to start the run "
                               "over, or restore it from a copy") from None


def check_out(path: str | Path, flag: str = "--out", is_dir: bool | None = False) -> Path:
    """An output we may create (nothing is created yet): the nearest existing ancestor is a writable dir.
    ``is_dir``: the output must be a folder (True), a file (False), or either (None)."""
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    if path.exists():
        if is_dir is not None and is_dir != path.is_dir():
            raise InvalidInput(f"{name}: {'a file, not a folder' if is_dir else 'a folder, not a file'}")
        if not (path.is_dir() or path.is_file()):  # a device or a pipe: the rename would replace the node itself
            raise InvalidInput(f"{name}: not a regular file (vlv writes a new file and renames it into place)")
    # An existing file is replaced by a rename in its folder: that folder is what must take a new file.
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidInput(f"{name}: {parent} is a file, not a folder")
    _probe(parent, name)
    return path


def _probe(folder: Path, name: str) -> None:
    """Create (and drop) a nameless file in ``folder``: permission bits alone pass root everywhere, and a read-only
    mount or a virtual file system refuses only the write itself, which would come after the work."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".vlv-probe-"):
            pass
    except OSError as e:
        raise InvalidInput(f"{name}: cannot write to {folder} ({e.strerror or e})") from None


def require_dirs(*folders: str | Path | None) -> None:
    """Each given folder exists (None: not given)."""
    for folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")


def require_data(data: str | Path | None) -> None:
    """A dataset is a folder, a .tar / .parquet file or a brace pattern of them (checked when opened)."""
    if data is not None and "{" not in str(data) and not Path(data).exists():
        raise FileNotFoundError(f"no such dataset: {data}")


def require_empty(out: str | Path) -> None:
    """An output dir that is absent or empty: an import never mixes its files with others'."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not an empty dir: refusing to overwrite it")


def check_name_or_path(value: str, names: Iterable[str], kind: str, flag: str = "") -> None:
    """Refuse a bare name that is both a shipped ``kind`` and a local folder: which one was meant is a guess."""
    if value in set(names) and Path(value).is_dir():
        raise InvalidInput(f"{flag + ' ' if flag else ''}{value}: both the {kind} {value!r} and the folder "
                           f"./{value} exist; write ./{value} for the folder, or rename it")
