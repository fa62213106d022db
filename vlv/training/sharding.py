"""Sharded training (FSDP2): a trainable module's weights, gradients and AdamW state split over the processes.

Stage 2 at full scale fine-tunes a 3B LLM: ~16 bytes per parameter in fp32 with AdamW, more than one GPU holds.
``fully_shard`` (PyTorch FSDP2, per-parameter DTensor shards) wraps each trainable transformer block (the classes
a transformers model names in ``_no_split_modules``, as accelerate's transformer wrap policy reads them) and then
the whole trainable module as the root unit, so every forward the root encloses (stage 2: prefix, token
embeddings, the LM) all-gathers what it needs. Frozen parameters outside the blocks (CLIP T, a frozen stage-1
encoder) are ``ignored_params``: replicated, never gathered. Any task can train this way; stage 2 is the one
that needs it. This module is the production path on GPUs and the one the CPU tests run (gloo): accelerate
enables FSDP only on GPUs, so vlv calls ``fully_shard`` itself under a plain DDP-style launch.

Checkpoints while training are distributed (``torch.distributed.checkpoint``: each rank writes its shards of the
trainable weights and optimizer state; a DDP run on several processes writes the same layout, its replicated
tensors spread over the ranks); a finished run holds the usual consolidated safetensors, gathered onto the
process that writes them (:func:`gathered`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from vlv.errors import InvalidInput

SHARDS = "shards"  # the distributed checkpoint inside run/checkpoint


def mesh_for(device: torch.device) -> DeviceMesh:
    """One data-parallel dimension over every process (the launcher's process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInput("sharded training needs several processes: launch with torchrun or accelerate launch")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights and fp32 gradient reduction; fp32 throughout otherwise."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks a transformers model declares unsplittable (``_no_split_modules``) that train."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and _trains(m)]


def shard(root: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, reshard_after_forward: bool = True,
          methods: tuple[str, ...] = ()) -> FSDPModule:
    """``fully_shard`` each trainable transformer block of ``root``, then ``root`` itself, in place.

    Frozen parameters outside those blocks (a frozen T or encoder) are ``ignored_params``: whole on every rank,
    never gathered. ``methods``: entry points other than ``forward`` that must gather the root's shards (e.g.
    generation). ``reshard_after_forward=False`` keeps gathered weights from forward to backward (ZeRO-2's layout:
    less communication, more memory); True frees them (ZeRO-3's).
    """
    units = layer_units(root)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    in_units = {id(p) for u in units for p in u.parameters()}
    ignored = {p for p in root.parameters() if not p.requires_grad and id(p) not in in_units}
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
    for name in methods:
        register_fsdp_forward_method(root, name)
    return root  # type: ignore[return-value]  # fully_shard turned it into an FSDPModule in place


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


# ------------------------------------------------------------------------------------------- checkpoints
def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_shards(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Collective: every rank writes its shards of the trainable weights, the optimizer state and ``extra`` (an
    EMA's weights by name) under path. Tensors every rank holds whole (DDP's) are written once, each by the rank
    DCP's planner picks to even out the bytes per rank."""
    dcp.save({"model": _trainable(model), "optim": get_optimizer_state_dict(model, opt), **(extra or {})},
             checkpoint_id=path)


def load_shards(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Collective and strict: the checkpoint's trainable weights (optimizer state, ``extra``) into this model, in
    place, sharded or not, on any number of processes."""
    state: dict = {"model": _trainable(model), **(extra or {})}
    if opt is not None:
        state["optim"] = get_optimizer_state_dict(model, opt)
    with warnings.catch_warnings():  # one process resuming a checkpoint of several is what it asked for
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=path)  # weights in place; raises on a missing key
    if opt is not None:
        set_optimizer_state_dict(model, opt, state["optim"])


@contextmanager
def gathered(module: nn.Module, keep: bool) -> Iterator[None]:
    """Collective: inside, ``module``'s sharded parameters are whole, on the CPU, where ``keep`` (the process
    that saves); elsewhere they are gathered and dropped, so a save_pretrained needs no collective and runs on
    one process. The shards are put back on exit. Nothing happens to a module that is not sharded."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}  # tied parameters gathered once
    try:
        for m in module.modules():  # the same order on every rank: the gathers pair up
            for name, p in list(m._parameters.items()):
                if not isinstance(p, DTensor):
                    continue
                if id(p) not in whole:
                    full = p.detach().full_tensor().cpu()
                    whole[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if keep else p
                if keep:
                    swapped.append((m, name, p))
                    m._parameters[name] = whole[id(p)]
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p
