"""What every model of vlv shares: trainable-state I/O by parameter name, and atomic files.

A checkpoint or a run dir holds the parameters that train (``trainable_state``), never the frozen ones that a
source dir already holds; loading is strict (``load_trainable_state``). Every file is written atomically
(temp + rename), so a kill never leaves a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from vlv.errors import InvalidInput


def in_run_dir(run: str | Path, source: str) -> str:
    """A source a run dir's config names relatively is read against the run dir first, so a run dir that holds
    its parts can move; anything else (absolute paths, shipped names) is returned as it is."""
    inside = Path(run) / source
    return str(inside) if not Path(source).is_absolute() and inside.is_dir() else source


def _temp_for(path: Path) -> Path:
    """A temp name of this process's own: ranks writing the same file never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file then rename, so a kill never leaves a half-written file."""
    path = Path(path)
    tmp = _temp_for(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_png(image, path: Path) -> None:
    """A PIL image as PNG to a temp name, then renamed: a failure never leaves a torn file under the final name."""
    path = Path(path)
    tmp = _temp_for(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` to a temp file then rename: a killed save never leaves a torn file."""
    path = Path(path)
    tmp = _temp_for(path)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter in full: a sharded one (FSDP2's DTensor) is gathered, one at a time, to the CPU."""
    if isinstance(p, DTensor):
        return p.full_tensor().cpu()  # collective: every rank calls it, in the same order
    return p.detach().contiguous()


def load_torch_file(path: Path) -> object:
    """``torch.load`` of a user's checkpoint (tensors only, never code); a torn or foreign file names itself."""
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as e:
        reason = ("it holds objects other than tensors, which vlv does not unpickle" if "Unsupported global" in str(e)
                  else "torn, or not a torch.save file")
        raise InvalidInput(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def trainable_state(module: torch.nn.Module, trainable: bool = True) -> dict[str, torch.Tensor]:
    """Parameters by name, split by requires_grad: a checkpoint holds the trainable ones (frozen never).

    named_parameters deduplicates, so tied weights appear once. Sharded parameters come back whole (a collective:
    under FSDP2 every rank calls this).
    """
    return {n: _whole(p.detach()) for n, p in module.named_parameters() if p.requires_grad == trainable}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor], trainable: bool = True,
                         source: str | Path | None = None) -> None:
    """Strict: the keys must be exactly the module's trainable (or frozen) parameters, shapes equal.

    A mismatch is the user's (weights of another model), so it raises InvalidInput, naming ``source``.
    """
    where = f"{source}: " if source else ""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad == trainable}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        kind = "trainable" if trainable else "frozen"
        raise InvalidInput(f"{where}{kind} weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise InvalidInput(f"{where}{n}: checkpoint shape {tuple(state[n].shape)} != model {tuple(p.shape)}")
            p.copy_(state[n])


@torch.no_grad()
def round_weights(tensors: list[torch.Tensor], dtype: str) -> None:
    """Floating tensors rounded in place to ``dtype`` (``"bfloat16"``) and back: the values a checkpoint saved in
    that dtype holds, kept in the module's own dtype. Round to nearest even, as ``Tensor.to`` casts everywhere."""
    target = getattr(torch, dtype)
    for t in tensors:
        if t.is_floating_point() and t.dtype != target:
            t.copy_(t.to(target))
