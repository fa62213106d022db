"""What the inference jobs write: image names that stay unique and traceable, and outputs that a killed run over
many images resumes.

Names. An input image is named by its path relative to the input root, the deepest folder holding every input
given: one folder names its images as its own ``captions.jsonl`` would (``a.png``), two folders keep them apart
(``val/a.png``, ``test/a.png``), and ``root / name`` finds the file again.

Partial outputs. A job cuts its images into units (an image, or a batch whose seed follows its offset) and saves
each finished batch as one file, written atomically, into a partial folder (:class:`Partial`) under the job's
key (``key.json``): the image files' names, sizes and modification times, the model dirs' files' names, sizes and
modification times, and the settings that change a result. A re-run with the same key skips the finished units;
with any other key it starts over; a finished job removes its partial folder, so a re-run over a complete output
replaces it. Under torchrun / accelerate launch rank r takes the units u with u % W == r, so no rank's progress
moves another's share, and rank 0 merges every rank's results in input order onto the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from vlv.checks import read_json
from vlv.data.images import IMAGE_EXTENSIONS
from vlv.errors import InvalidInput, UserError
from vlv.modeling import atomic_save_file, atomic_write_text, write_json

KEY_FILE = "key.json"
PARTIAL_SUFFIX = ".partial"


# ---------------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class Inputs:
    """Image files in the order a job reads them, each with its unique name relative to ``root``."""

    root: Path  # absolute
    paths: list[Path]  # as the user gave them (joined with a folder's file names)
    names: list[str]  # posix, relative to root

    def __len__(self) -> int:
        return len(self.paths)

    def only(self, keep: Iterable[Path]) -> Inputs:
        """The inputs among ``keep`` (the readable ones), in order."""
        kept = set(keep)
        pairs = [(p, n) for p, n in zip(self.paths, self.names, strict=True) if p in kept]
        return Inputs(self.root, [p for p, _ in pairs], [n for _, n in pairs])


def _listed(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(q for q in path.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"no such image or folder: {path}")


def name_inputs(given: Sequence[str | Path]) -> Inputs:
    """Files and folders (a folder's images, sorted) -> their files, named relative to the input root. The same
    file given twice is refused: its outputs would overwrite each other."""
    groups = [(Path(p), _listed(Path(p))) for p in given]
    if not any(files for _, files in groups):
        raise FileNotFoundError("no images found in " + ", ".join(map(str, given)))
    bases = [os.path.abspath(p if p.is_dir() else p.parent) for p, _ in groups]
    root = Path(os.path.commonpath(bases))
    paths, names, seen = [], [], {}
    for _, files in groups:
        for f in files:
            name = Path(os.path.abspath(f)).relative_to(root).as_posix()
            if name in seen:
                raise InvalidInput(f"{f}: given twice (also as {seen[name]}); its outputs would overwrite each other")
            seen[name] = f
            paths.append(f)
            names.append(name)
    return Inputs(root, paths, names)


def output_names(inputs: Inputs, out: Path, suffix: str) -> list[str]:
    """Each input's output file in the folder ``out`` (its name with ``suffix``), refusing two inputs that would
    write one file (``a.jpg`` and ``a.png`` -> ``a.png``) and an output that would overwrite an input."""
    outs, seen = [], {}
    sources = {os.path.abspath(p) for p in inputs.paths}
    for path, name in zip(inputs.paths, inputs.names, strict=True):
        target = Path(name).with_suffix(suffix).as_posix()
        if target in seen:
            raise InvalidInput(f"{seen[target]} and {path} would both be written as {out / target}; rename one, "
                               "or give them in separate runs")
        if os.path.abspath(out / target) in sources:
            raise InvalidInput(f"--out {out}: {target} would overwrite the input image {out / target}; choose "
                               "another --out")
        seen[target] = path
        outs.append(target)
    return outs


def refuse_input_as_output(out: Path, paths: Iterable[Path]) -> None:
    """A file output that is one of the inputs would replace it."""
    if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
        raise InvalidInput(f"--out {out} is one of the input images: choose another --out")


# ------------------------------------------------------------------------------------------------------ keys
def _stamp(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 of names, sizes and modification times: cheap, and any rewrite of a file changes it."""
    h = hashlib.sha256()
    for name, f in files:
        st = f.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _model_files(folder: Path) -> list[tuple[str, Path]]:
    """A model dir's files and its parts' (a Stable Diffusion dir's unet/, vae/, ...), named relative to it."""
    files = [f for f in sorted(folder.iterdir()) if f.is_file()]
    files += [f for d in sorted(folder.iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]
    return [(f.relative_to(folder).as_posix(), f) for f in files]


def job_key(command: str, inputs: Inputs, models: Sequence[Path], settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs of a job the same, so one may finish the other's work (see the module's doc)."""
    return {"command": command, "images": len(inputs),
            "inputs": _stamp(zip(inputs.names, inputs.paths, strict=True)),
            "models": _stamp((f"{m.resolve()}/{n}", f) for m in models for n, f in _model_files(m)),
            "settings": json.loads(json.dumps(settings, default=str))}


# --------------------------------------------------------------------------------------------------- partial
# How long a process of a job (a cache, an inference or evaluation over a large set) waits at a collective: the
# early ones wait there for the slowest one's share, longer than torch's default (10 minutes under NCCL).
JOB_TIMEOUT = timedelta(hours=3)


def process_state():
    """This process's rank and the world: accelerate's, so torchrun and accelerate launch work alike. Without a
    GPU, accelerate joins the processes only when told it runs on CPUs (else each would think it is alone)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=JOB_TIMEOUT)


def partial_folder(out: Path, is_dir: bool) -> Path:
    """Beside a file output (``c.jsonl.partial``), inside a folder output (``rec/.partial``)."""
    out = Path(out)
    return out / PARTIAL_SUFFIX if is_dir else out.with_name(out.name + PARTIAL_SUFFIX)


class Partial:
    """A job's finished batches, one file each, in a folder kept between runs of the same key.

    Each batch file is named by its first input index, unique: a later run never restarts a batch whose first
    image is done. Files are written atomically, so a kill leaves only whole files (and temp files, ignored).
    """

    def __init__(self, folder: Path, key: dict[str, Any], state=None):
        self.folder, self.key = Path(folder), key
        self.state = state if state is not None else process_state()
        self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self) -> set[str]:
        """Rank 0 keeps a folder of the same key and empties one of another; then every rank reads the names
        done. Returns them."""
        if self.is_main:
            self._ready()
        self.state.wait_for_everyone()
        return self.done()

    def _ready(self) -> None:
        key_file = self.folder / KEY_FILE
        if self.folder.exists():
            if not key_file.is_file():
                raise FileExistsError(f"{self.folder} exists and holds no {KEY_FILE}: not a partial output of vlv; "
                                      "move it away")
            try:
                same = read_json(key_file) == self.key
            except UserError:  # torn: nothing in it can be trusted
                same = False
            if same:
                return
            print(f"starting over: {self.folder} holds the work of other inputs or settings")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        write_json(key_file, self.key)

    def _files(self, suffix: str) -> list[Path]:
        return sorted(self.folder.glob(f"*{suffix}")) if self.folder.is_dir() else []

    def done(self) -> set[str]:
        """The input names every finished batch holds."""
        names = {row["image"] for row in self.rows()}
        for f in self._files(".safetensors"):
            names.update(_tensor_names(f))
        return names

    def mine(self, n_units: int, done_units: set[int]) -> list[int]:
        """This rank's units still to do."""
        return [u for u in range(self.rank, n_units, self.world) if u not in done_units]

    def save_rows(self, first: int, rows: list[dict[str, Any]]) -> None:
        """A finished batch's rows (each with its input's ``image`` name), as one JSON-lines file."""
        atomic_write_text(self.folder / f"{first:09d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def save_tensors(self, first: int, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """A finished batch's tensors (N, ...) for the inputs ``names``, as one safetensors file."""
        atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, self.folder / f"{first:09d}.safetensors",
                         metadata={"images": json.dumps(names)})

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for f in self._files(".jsonl") for line in f.read_text().splitlines() if line]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Every saved tensor, its rows in the order of ``names`` (all of which must be saved)."""
        from safetensors.torch import load_file

        where: dict[str, tuple[int, int]] = {}
        parts = []
        for k, f in enumerate(self._files(".safetensors")):
            parts.append(load_file(f))
            where.update({name: (k, j) for j, name in enumerate(_tensor_names(f))})
        self._require(where, names)
        return {key: torch.stack([parts[k][key][j] for k, j in (where[n] for n in names)]) for key in parts[0]}

    def ordered_rows(self, names: list[str]) -> list[dict[str, Any]]:
        """The saved rows in the order of ``names`` (all of which must be saved)."""
        by_name = {row["image"]: row for row in self.rows()}
        self._require(by_name, names)
        return [by_name[n] for n in names]

    def _require(self, saved: dict[str, Any], names: list[str]) -> None:
        missing = [n for n in names if n not in saved]
        if missing:  # every rank finished before the merge: a lost file is a bug, or another hand in the folder
            raise RuntimeError(f"{self.folder}: {len(missing)} of {len(names)} results missing at the merge "
                               f"(first {missing[0]})")

    def barrier(self) -> None:
        """Wait for every rank: after it, every rank's batches are saved (rank 0 then merges)."""
        self.state.wait_for_everyone()

    def finish(self) -> None:
        """After rank 0's merge: the folder goes, and every rank returns with the output in place."""
        if self.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.state.wait_for_everyone()


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("images", "[]"))
