"""What every model of vlv shares: trainable-state I/O by parameter name, devices and precisions, atomic files.

A checkpoint or a run dir holds the parameters that train (``trainable_state``), never the frozen ones that a
source dir already holds; loading is strict (``load_trainable_state``). Models for inference are built empty
(``empty_model``: parameters on the meta device) and get their weights straight from the files in the chosen
dtype and device (``load_weights_file``), so no fp32 copy is made first. Every file is written atomically
(temp + rename), so a kill never leaves a torn one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file
from torch import nn
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


# ------------------------------------------------------------------------------ devices and precisions
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_KINDS = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None: cuda when present, else cpu. Checked before anything loads: an unknown or absent device is one line.
    Under a launcher (torchrun / accelerate launch set LOCAL_RANK), a bare cuda is this process's own GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInput(f"device {str(device)!r}: not a device (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.type not in DEVICE_KINDS:
        raise InvalidInput(f"device {str(device)!r}: vlv runs on {', '.join(DEVICE_KINDS)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"device {str(device)!r}: no CUDA device is available to this torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidInput(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput(f"device {str(device)!r}: MPS is not available to this torch")
    return dev


def default_precision(device: torch.device) -> str:
    """bf16 on a CUDA GPU that computes it natively (Ampere on): the paper's stage 2 trains in bf16, so a released
    captioner holds bf16 weights, bf16 halves the memory of the 3B LLM and runs on tensor cores, and unlike fp16
    it cannot overflow in SD's VAE. fp32 elsewhere: on the CPU it keeps every number as before."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def resolve_dtype(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A precision name (fp32, bf16, fp16) or a floating torch dtype; None: ``default_precision`` of the device."""
    if precision is None:
        precision = default_precision(device)
    if isinstance(precision, torch.dtype):
        if precision not in PRECISIONS.values():
            raise InvalidInput(f"dtype {precision}: choose one of {', '.join(map(str, PRECISIONS.values()))}")
        return precision
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a loaded model computes: its (first) parameter's device and dtype."""
    p = next(module.parameters())
    return p.device, p.dtype


# ------------------------------------------------------------------------------ empty models, streamed weights
M = TypeVar("M", bound=nn.Module)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Float tensors made without a dtype (parameters, float buffers) come out in ``dtype``, as transformers'
    ``from_pretrained(dtype=...)`` builds its models; buffers made in an explicit dtype (RoPE's fp32) keep it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def empty_model(build: Callable[[], M], dtype: torch.dtype = torch.float32) -> M:
    """The module ``build`` makes, its new parameters on the meta device (no memory, no random init) and its
    buffers real; modules passed into ``build`` keep their weights. Tied weights are tied again afterwards
    (transformers does not tie meta parameters while building), so each tie is one parameter to load."""
    from accelerate import init_empty_weights
    from transformers import PreTrainedModel

    with init_empty_weights(include_buffers=False), default_dtype(dtype):
        model = build()
    outer: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(o + ".") for o in outer):
            m.tie_weights()
            outer.append(name)
    return model


def _aliases(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Each parameter's name (as ``named_parameters`` gives it once) -> every (module, attribute) holding it."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((m, attr))
    return {n: holders[id(p)] for n, p in module.named_parameters()}


def load_weights_file(module: nn.Module, path: str | Path, trainable: bool = True,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
    """A safetensors file's tensors become the module's trainable (or frozen) parameters, read one at a time and
    put straight into ``dtype`` on ``device``: meta parameters get their first memory here, so loading never holds
    a second copy of the model. As strict as ``load_trainable_state`` (keys and shapes, from the header before any
    tensor is read); tied parameters stay tied."""
    from safetensors import safe_open

    from vlv.checks import safetensors_keys

    path = Path(path)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad == trainable}
    keys = safetensors_keys(path)
    missing, unexpected = sorted(set(params) - set(keys)), sorted(set(keys) - set(params))
    if missing or unexpected:
        kind = "trainable" if trainable else "frozen"
        raise InvalidInput(f"{path}: {kind} weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    aliases = _aliases(module)
    with safe_open(path, framework="pt") as f:
        for n, p in params.items():
            shape = tuple(f.get_slice(n).get_shape())
            if shape != tuple(p.shape):
                raise InvalidInput(f"{path}: {n}: checkpoint shape {shape} != model {tuple(p.shape)}")
            t = f.get_tensor(n)
            new = nn.Parameter(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype),
                               requires_grad=p.requires_grad)
            for holder, attr in aliases[n]:
                holder._parameters[attr] = new


def check_materialized(module: nn.Module, what: str) -> None:
    """Every parameter has memory: one left on the meta device would fail far away, at the first forward."""
    empty = [n for n, p in module.named_parameters() if p.is_meta]
    if empty:
        raise RuntimeError(f"{what}: {len(empty)} parameter(s) got no weights, first {empty[0]}")
