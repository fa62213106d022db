"""What a run will cost, known before anything loads: ``vlv plan``, and the memory check of ``train`` / ``precompute``.

The run's real architectures are built without weights (the meta device), turned into fake tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no storage), sharded as the loop shards them
(vlv's own ``fully_shard`` over a fake process group of N ranks, ``init_process_group("fake")``: no
communication), and one optimizer step of the run's own loss runs on them: the task's loss on a batch of the task's
shapes, under the recipe's autocast, then gradient clipping and AdamW, with the optimizer state already there (as
from the second step on). torch's ``MemTracker`` (``torch.distributed._tools``) follows every tensor the step
holds and gives the peak one process reaches, split into weights, gradients, optimizer state and activations;
torch's FLOP counter (``torch.utils.flop_counter``) counts the step's FLOPs as executed (gradient checkpointing's
recomputation included). No GPU and no weights are needed: a full-scale plan takes under a minute of CPU.

The fake step runs on the CPU's dispatch (autocast's CPU op lists). A GPU plan (``target="cuda"``, the default)
takes what a GPU runs where the two differ in memory: the memory-efficient attention kernel (a CPU falls back to
the math path under attention dropout) and foreach AdamW (its temporaries); ``target="cpu"`` plans a CPU's step
(``benchmarks/plan_check.py`` measures those). By hand, and said so in the report: DDP's gradient buckets (one
more copy of the trainable gradients: accelerate leaves ``gradient_as_bucket_view`` off), and the share of a GPU
the check leaves to what no tensor holds (the CUDA context, NCCL buffers, the caching allocator's fragmentation).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPTextConfig,
    CLIPTextModel,
    Florence2Config,
)
from transformers import Florence2ForConditionalGeneration as Florence2

from vlv.captioner import Captioner
from vlv.config import CACHE_BATCH_SIZE, CaptionerConfig, EncoderConfig
from vlv.data.caches import CACHE_DTYPES
from vlv.decoder import DiffusionDecoder
from vlv.decoders import SD2, family_named
from vlv.diffusion import pipeline_configs
from vlv.encoder import CONFIG_FILE as ENCODER_FILE
from vlv.encoder import VLVEncoder, florence2_architecture
from vlv.errors import InvalidInput
from vlv.lm import is_lm_dir, lm_config, load_tokenizer
from vlv.shipped import is_shipped, resolve_encoder, resolve_lm_name
from vlv.text_encoder import assemble_text_encoder, encode_embeds, text_class
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.draws import Draws
from vlv.training.recipes import RECIPES, list_recipes, load_sections, user_input
from vlv.training.sharding import precision_policy, shard
from vlv.training.stage1 import encoder_config, stage1_loss
from vlv.training.stage2 import stage2_loss

GIB = 2**30
USABLE = 0.9  # the share of a GPU a plan may fill: the rest is the CUDA context's, NCCL's and fragmentation's
Target = Literal["cuda", "cpu"]  # whose step is planned: a GPU's (foreach AdamW) or a CPU's
DEFAULT_DECODER = "sd21-base"  # the paper's decoder architecture (vlv/configs/sd21-base-*.json)
DEFAULT_STAGE2_ENCODER = "florence2-large"  # a stage-1 encoder as stage1/paper trains it
DEFAULT_LM = "qwen2.5-3b"


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class Memory:
    """Bytes one process holds at the peak of a step, by kind (MemTracker's categories at that moment)."""

    weights: int  # parameters and buffers (sharded ones: this process's shards)
    gradients: int
    optimizer: int
    activations: int  # activations, backward temporaries, gathered shards, the batch
    buckets: int = 0  # DDP's gradient buckets, by hand
    optimizer_step: int = 0  # the temporaries of AdamW's step (foreach), when the peak is in it

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.optimizer_step + self.activations + self.buckets

    def breakdown(self) -> str:
        """The peak by kind, as held at that moment (before the first backward a step holds no gradients)."""
        return (f"weights {_binary(self.weights)} + gradients {_binary(self.gradients)} + optimizer "
                f"{_binary(self.optimizer)}"
                + (f" + its step's temporaries {_binary(self.optimizer_step)}" if self.optimizer_step else "")
                + f" + activations {_binary(self.activations)}"
                + (f" + DDP buckets {_binary(self.buckets)} (by hand)" if self.buckets else ""))


@dataclass
class CacheSize:
    """A cache of what a run keeps frozen (``vlv.data.caches``): bytes on disk per sample, and in all."""

    kind: str
    per_sample: int
    used: bool  # the run builds (or reads) it
    samples: int | None = None

    @property
    def total(self) -> int | None:
        return None if self.samples is None else self.per_sample * self.samples


@dataclass
class CostPlan:
    """What one run costs: per process memory of a step, FLOPs, checkpoint and cache sizes, the global batch."""

    task: str
    recipe: str | None
    processes: int
    sharding: str
    precision: str
    batch_size: int
    grad_accum: int
    parameters: int
    trainable: int
    memory: Memory
    flops_per_sample: float  # forward + backward of one sample, as executed
    checkpoint_bytes: int  # run/checkpoint: trainable weights + optimizer state (+ EMA), all ranks together
    weights_bytes: int  # the finished run's trained weights (safetensors, fp32)
    caches: list[CacheSize]
    samples: int | None = None
    gradient_checkpointing: bool = False
    caption_tokens: int | None = None  # stage 2: caption + EOS tokens a sample's step took

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes * self.grad_accum

    def fits(self, gpu_gib: float) -> bool:
        return self.memory.peak <= USABLE * gpu_gib * GIB

    def lines(self, gpu_gib: float | None = None) -> list[str]:
        """The report ``vlv plan`` prints."""
        m, unit = self.memory, "image" if self.task == "stage1" else "sample"
        out = [f"{self.recipe or self.task}: {self.processes} process(es), sharding {self.sharding}, precision "
               f"{self.precision}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}",
               f"global batch {self.global_batch} = {self.batch_size} per process x {self.processes} process(es) x "
               f"{self.grad_accum} accumulation step(s)"
               + (f"; captions of {self.caption_tokens} tokens" if self.caption_tokens else ""),
               f"parameters {_count(self.parameters)}, {_count(self.trainable)} trainable",
               f"peak memory per process, one step: {_binary(m.peak)} = {m.breakdown()}",
               f"FLOPs per {unit}, forward + backward: {_flops(self.flops_per_sample)}"
               + (" (recomputation included)" if self.gradient_checkpointing else ""),
               f"checkpoint {_binary(self.checkpoint_bytes)} (trainable weights + AdamW state), final weights "
               f"{_binary(self.weights_bytes)}"]
        for c in self.caches:
            total = f", {_decimal(c.total)} for {c.samples:,} {unit}s" if c.total is not None else ""
            out.append(f"cache {c.kind} ({'on' if c.used else 'off'}): {_decimal(c.per_sample)} per {unit}{total}")
        if gpu_gib is not None:
            verdict = "fits" if self.fits(gpu_gib) else "does NOT fit"
            out.append(f"{verdict} a {gpu_gib:g} GiB GPU: {_binary(m.peak)} of {USABLE * gpu_gib:.1f} GiB usable "
                       f"({USABLE:.0%}; the rest is left to the CUDA context, NCCL and fragmentation)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "global_batch": self.global_batch, "peak_bytes": self.memory.peak}


def _decimal(n: float) -> str:
    """Disk sizes, as disks are sold."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _binary(n: float) -> str:
    """Memory sizes, as GPUs report them."""
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def check_fits(plan: CostPlan, gpu_gib: float) -> None:
    """One line, before anything loads, when a step of the plan does not fit a GPU of ``gpu_gib`` GiB."""
    if plan.fits(gpu_gib):
        return
    m = plan.memory
    if not plan.trainable:  # a forward over a batch (precompute)
        raise InvalidInput(f"{plan.task} does not fit the GPU: a batch's forward needs {_binary(m.peak)} (weights "
                           f"{_binary(m.weights)}, activations {_binary(m.activations)} at batch {plan.batch_size}), "
                           f"more than {USABLE:.0%} of {gpu_gib:g} GiB; try a smaller --batch-size")
    hints = [h for h, ok in (("a smaller --batch-size (with --grad-accum to keep the global batch)",
                              m.activations > m.peak / 4),  # else the batch is not what fills the GPU
                             ("--gradient-checkpointing", not plan.gradient_checkpointing),
                             ("--sharding fsdp2", plan.sharding != "fsdp2" and plan.processes > 1)) if ok]
    raise InvalidInput(f"{plan.recipe or plan.task} does not fit the GPU: a step at batch {plan.batch_size} needs "
                       f"{_binary(m.peak)} per process at its peak ({m.breakdown()}), more than {USABLE:.0%} of "
                       f"{gpu_gib:g} GiB; try {' or '.join(hints or ['more processes with --sharding fsdp2'])}")


def gpu_memory_gib() -> float | None:
    """This process's GPU's memory in GiB; None without one."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    return torch.cuda.get_device_properties(index).total_memory / GIB


def check_memory(make_plan: Callable[[], CostPlan], gpu_gib: float | None = None) -> CostPlan | None:
    """The check of ``train`` and ``precompute``: when a GPU is found (or ``gpu_gib`` given) the plan is made and a
    run that does not fit stops in one line; on a CPU without ``gpu_gib`` nothing is planned (None)."""
    limit = gpu_gib if gpu_gib is not None else gpu_memory_gib()
    if limit is None:
        return None
    if dist.is_available() and dist.is_initialized():  # the caller's group is up: no fake one can be made now
        print("vlv: memory plan skipped: a process group exists already")
        return None
    plan = make_plan()
    check_fits(plan, limit)
    if not int(os.environ.get("RANK", 0)):
        what = "a step" if plan.trainable else "a batch's forward"
        print(f"[plan] {_binary(plan.memory.peak)} per process at the peak of {what}, of {USABLE * limit:.1f} GiB "
              f"usable ({USABLE:.0%} of {limit:g})" + ("; vlv plan gives the breakdown" if plan.trainable else ""))
    return plan


def world_size() -> int:
    """The launch's process count, known before its process group exists (torchrun / accelerate set it)."""
    return int(os.environ.get("WORLD_SIZE", 1))


# -------------------------------------------------------------------------------- fake models and the step
class _StepMemory(MemTracker):
    """torch's MemTracker for one step of a partly frozen model. Two changes: only parameters that train get
    gradient hooks (torch 2.13 hooks every parameter, which raises on a frozen one), and only the global peak is
    kept (the per-module peaks it also updates at every op cost minutes at full scale)."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True
                                         ) -> tuple[int, int]:
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._gradient),
                        p.register_post_accumulate_grad_hook(lambda q: self._gradient(q.grad)))
        return sizes

    def _gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)


@contextlib.contextmanager
def _gpu_attention() -> Iterator[None]:
    """A GPU plan's attention: the GPU's memory-efficient kernel (torch's own op, whose fake version gives its
    outputs and saved tensors), where the CPU's dispatch would fall back to the math path whenever attention
    dropout is on (Florence-2's BART trains with it) and hold every L x L probability a GPU never makes. Swapped in
    where transformers and diffusers look it up (a torch function mode would be off inside backward, where
    gradient checkpointing recomputes the forward)."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _efficient_attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                         enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` as CUDA runs it with a mask, dropout or fp32: (B, H, Lq, E) out."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped keys repeated to the query heads, as SDPA does
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    bias = None
    if attn_mask is not None:  # a boolean mask becomes an additive bias, as SDPA converts it
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        bias = attn_mask.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key.to(query.dtype), value.to(query.dtype), bias, needs_grad, dropout_p, is_causal, scale=scale)[0]


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


class _Flops(FlopCounterMode):
    """torch's FlopCounterMode without its per-module tracking, which wraps every module's tensors in autograd
    functions: under gradient checkpointing those keep alive activations the step frees, and a plan of memory
    must not change the memory it plans. The CPU's attention kernel, which the fake step dispatches to, counts
    with torch's own attention formulas (torch 2.13 registers them for the GPU kernels only)."""

    def __init__(self) -> None:
        aten = torch.ops.aten
        super().__init__(display=False, custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward})

    def __enter__(self) -> _Flops:
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self.mode.__exit__(*args)
        self.mode = None


def _parameters(modules: list[nn.Module]) -> tuple[int, int]:
    """(parameters, trainable ones) of modules, each tensor once (tied weights are one)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        seen.update({id(p): p for p in m.parameters()})
    return sum(p.numel() for p in seen.values()), sum(p.numel() for p in seen.values() if p.requires_grad)


def _to_fake(module: nn.Module, mode: FakeTensorMode) -> None:
    """A meta module's tensors as fake CPU tensors, in place; weights shared between modules stay shared
    (``to_empty`` replaces each module's reference on its own)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, name))
    with mode:
        module.to_empty(device="cpu")
    for refs in owners.values():
        first = refs[0][0]._parameters[refs[0][1]]
        for m, name in refs[1:]:
            m._parameters[name] = first


@contextlib.contextmanager
def _fake_mesh(processes: int) -> Iterator[Any]:
    """A one-dimensional mesh of ``processes`` ranks over a fake process group (no communication, rank 0's view)."""
    if dist.is_initialized():
        raise ValueError("a sharded plan makes its own fake process group: plan before the run's group exists")
    dist.init_process_group("fake", rank=0, world_size=processes)
    try:
        yield init_device_mesh("cpu", (processes,))
    finally:
        dist.destroy_process_group()


def _global_bytes(t: torch.Tensor) -> int:
    """A tensor's bytes over all ranks (a DTensor's global shape)."""
    return t.numel() * t.element_size()


def _local_bytes(t: torch.Tensor) -> int:
    """A tensor's bytes on this rank (a DTensor's shard)."""
    return _global_bytes(t.to_local() if isinstance(t, DTensor) else t)


@dataclass
class _Step:
    """What one training step holds and runs, on fake modules (see :func:`_measure`)."""

    mode: FakeTensorMode  # the one the parts' tensors belong to
    parts: list[nn.Module]  # every module a process holds, fake already
    trainable: nn.Module  # the module the loop trains (wraps, shards)
    batch: Callable[[], dict[str, torch.Tensor]]  # a batch of this process, as the task makes it
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    methods: tuple[str, ...] = ()  # entry points fully_shard registers besides forward


@dataclass
class _Measured:
    memory: Memory
    flops: float  # per micro-step
    optimizer_bytes: int  # all ranks together
    trainable_bytes: int


def _measure(step: _Step, cfg: TrainConfig, processes: int, target: Target) -> _Measured:
    """One optimizer step of ``step`` under MemTracker and FlopCounterMode, on fake tensors; the optimizer state
    exists before it starts (as from the second step on). With accumulation, two micro-steps run (the second holds
    the first one's gradients)."""
    sharded = cfg.sharding != "ddp"
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(_fake_mesh(processes)) if sharded else None  # made of real tensors
        stack.enter_context(step.mode)
        model = step.trainable
        model.train()
        if sharded:
            shard(model, mesh, precision_policy(cfg.mixed_precision), reshard_after_forward=cfg.sharding == "fsdp2",
                  methods=step.methods)
        params = [p for p in model.parameters() if p.requires_grad]
        foreach = target == "cuda" or None  # fake tensors would not choose foreach; a GPU does
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=foreach)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # the state a step finds from the second step on
        opt.zero_grad(set_to_none=True)
        if target == "cuda":
            stack.enter_context(_gpu_attention())
        tracker = _StepMemory()
        tracker.track_external(*step.parts, opt)
        counter = _Flops()
        micro = min(cfg.grad_accum, 2)
        with tracker, counter:
            for i in range(micro):
                batch = step.batch()
                if sharded:
                    model.set_requires_gradient_sync(i == micro - 1)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                    loss = step.loss(model, batch)
                loss.backward()
                del loss, batch
                tracker.reset_mod_stats()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=foreach)
            opt.step()
            opt.zero_grad(set_to_none=True)
        snap: dict = {}
        for dev_snap in tracker.get_tracker_snapshot("peak").values():
            for k, v in dev_snap.items():
                snap[k] = snap.get(k, 0) + v
        optimizer_bytes = sum(_global_bytes(v) for s in opt.state.values() for v in s.values()
                              if isinstance(v, torch.Tensor))
        trainable_bytes = sum(_global_bytes(p) for p in params)
        local_grads = sum(_local_bytes(p) for p in params)
        state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    buckets = local_grads if not sharded and processes > 1 else 0
    in_optimizer = snap.get(_MemRefType.OPT, 0)  # the state, and the step's temporaries when the peak is in it
    memory = Memory(weights=snap.get(_MemRefType.PARAM, 0) + snap.get(_MemRefType.BUFFER, 0),
                    gradients=snap.get(_MemRefType.GRAD, 0), optimizer=min(state, in_optimizer),
                    activations=sum(snap.get(k, 0) for k in (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH)),
                    buckets=buckets, optimizer_step=max(0, in_optimizer - state))
    return _Measured(memory, counter.get_total_flops() / micro, optimizer_bytes, trainable_bytes)


def _plan(task: str, recipe: str | None, step: _Step, cfg: TrainConfig, processes: int, target: Target,
          caches: list[CacheSize], samples: int | None, checkpointing: bool) -> CostPlan:
    if processes < 1:
        raise InvalidInput(f"--processes must be >= 1, got {processes}")
    if cfg.sharding != "ddp" and processes < 2:
        raise InvalidInput(f"--sharding {cfg.sharding} shards over several processes: give --processes >= 2")
    parameters, trainable = _parameters(step.parts)
    measured = _measure(step, cfg, processes, target)
    ema = measured.trainable_bytes if cfg.ema_decay else 0
    return CostPlan(task, recipe, processes, cfg.sharding, "bf16" if cfg.mixed_precision == "bf16" else "fp32",
                    cfg.batch_size, cfg.grad_accum, parameters, trainable, measured.memory,
                    measured.flops / cfg.batch_size, measured.trainable_bytes + measured.optimizer_bytes + ema,
                    measured.trainable_bytes, caches, samples, checkpointing)


def _fake_mode(*parts: nn.Module) -> FakeTensorMode:
    """One fake mode for the parts, their tensors made fake in it (tensors of two modes never meet)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for part in parts:
        _to_fake(part, mode)
    return mode


# ----------------------------------------------------------------------------------------------- stage 1
def decoder_configs(source: str | Path | dict) -> dict[str, dict]:
    """The decoder's part configs: a shipped config stem (sd21-base), a shipped name (shapes-teacher), a Stable
    Diffusion dir, or the configs themselves."""
    if isinstance(source, dict):
        return source
    from vlv.shipped import resolve_decoder

    return pipeline_configs(resolve_decoder(source) if is_shipped(source) or Path(source).is_dir() else source)


def meta_decoder(source: str | Path | dict) -> DiffusionDecoder:
    """The frozen decoder's architecture on the meta device (see :func:`decoder_configs`)."""
    configs = decoder_configs(source)
    with torch.device("meta"):
        return DiffusionDecoder.from_configs(configs)


def meta_encoder(config: EncoderConfig) -> VLVEncoder:
    """A stage-1 encoder's architecture on the meta device (a Florence-2 dir gives its config, never weights)."""
    architecture = florence2_architecture(config.florence2)
    with torch.device("meta"):
        return VLVEncoder(config, Florence2(architecture))


def plan_stage1(settings: Stage1Settings, cfg: TrainConfig, processes: int = 1, samples: int | None = None,
                recipe: str | None = None, target: Target = "cuda", decoder: str | Path | dict | None = None,
                config: EncoderConfig | None = None) -> CostPlan:
    """The cost of a stage-1 run with these settings: the decoder (``decoder``, default ``settings.decoder``) and
    the encoder (``config``, default the one ``settings`` builds) as architectures only."""
    dec = meta_decoder(decoder if decoder is not None else settings.decoder)
    with user_input():
        config = config or encoder_config(settings, dec.text_dim)
    return plan_stage1_models(meta_encoder(config), dec, settings, cfg, processes, samples, recipe, target)


def plan_stage1_models(encoder: VLVEncoder, decoder: DiffusionDecoder, settings: Stage1Settings, cfg: TrainConfig,
                       processes: int = 1, samples: int | None = None, recipe: str | None = None,
                       target: Target = "cuda") -> CostPlan:
    """The cost of a stage-1 run of these meta modules (:func:`plan_stage1` builds them from the settings)."""
    if settings.gradient_checkpointing:  # as run_stage1 does
        decoder.enable_gradient_checkpointing()
    size = settings.image_size or decoder.image_size
    down = 2 ** (len(decoder.vae.config.block_out_channels) - 1)  # the VAE's downsampling, as DiffusionDecoder's
    latent = (decoder.vae.config.latent_channels, size // down, size // down)
    latents = settings.cache_latents or settings.latents_cache is not None
    vision = settings.cache_vision or settings.vision_cache is not None
    mode, side = _fake_mode(encoder, decoder), encoder.config.image_size
    with mode, torch.no_grad():
        features = encoder.image_features(torch.empty(1, 3, side, side)).shape[1:]  # (Nv, D)
    b = cfg.batch_size

    def batch() -> dict[str, torch.Tensor]:  # as Stage1Task.batch makes it: fp32 rows of the caches, or images
        out = {}
        if not (latents and vision):
            out["images"] = torch.empty(b, 3, size, size)  # (B, 3, H, W) in [-1, 1], the VAE's input
            if not vision:
                out["pixel_values"] = torch.empty(b, 3, side, side)  # (B, 3, S, S), the encoder's
        if latents:
            out["mean"], out["std"] = torch.empty(b, *latent), torch.empty(b, *latent)
        if vision:
            out["vision"] = torch.empty(b, *features)  # (B, Nv, D)
        return out

    draws = Draws(None, 0, processes)  # the global batch's draws, this rank's rows (no generator needed)
    step = _Step(mode, [encoder, decoder], encoder, batch,
                 lambda model, x: stage1_loss(decoder, model, x, draws, settings.high_noise_fraction).mean)
    caches = [CacheSize("latents", 2 * _numel(latent) * _itemsize("latents") + 1, latents, samples)]
    if not encoder.config.trains_vision:
        caches.append(CacheSize("vision", _numel(features) * _itemsize("vision") + 1, vision, samples))
    return _plan("stage1", recipe, step, cfg, processes, target, caches, samples, settings.gradient_checkpointing)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(kind: str) -> int:
    """Bytes per element of a cache's rows (its stored dtype); a row also has a one-byte ok flag."""
    return getattr(torch, CACHE_DTYPES[kind]).itemsize


# ----------------------------------------------------------------------------------------------- stage 2
def meta_text_encoder(decoder: str | Path | dict) -> torch.nn.Module:
    """The decoder's T on the meta device, frozen (SD3, SDXL, FLUX.1: all of it, as ``load_text_encoder`` gives it)."""
    configs = decoder_configs(decoder)
    pipeline = configs.get("model_index", {}).get("_class_name", SD2.pipeline)
    names = family_named(pipeline).text_encoders

    def part(name: str) -> torch.nn.Module:
        model, config = text_class(configs["model_index"], name) if "model_index" in configs else \
            (CLIPTextModel, CLIPTextConfig)
        return model(config.from_dict({k: v for k, v in configs[name].items() if k != "torch_dtype"}))

    with torch.device("meta"):
        te = assemble_text_encoder([part(name) for name in names])
    return te.requires_grad_(False).eval()


def meta_stage2_encoder(source: str, text_dim: int) -> VLVEncoder:
    """Stage 2's encoder on the meta device: a stage-1 run dir or shipped name (its saved architecture), or, for a
    plan, a named encoder config or Florence-2 dir built as stage1/paper trains it (the official trainable set)."""
    if is_shipped(source) or (Path(source) / ENCODER_FILE).is_file():
        meta = json.loads((resolve_encoder(source) / ENCODER_FILE).read_text())
        config = EncoderConfig(**meta["config"])
        with torch.device("meta"):
            return VLVEncoder(config, Florence2(Florence2Config.from_dict(meta["florence2"])))
    settings = Stage1Settings(decoder="", data="", encoder=source, trainable="official")
    with user_input():
        return meta_encoder(encoder_config(settings, text_dim))


def meta_lm(source: str | dict) -> nn.Module:
    """A causal LM's architecture on the meta device, fp32 as ``vlv.lm.build_lm`` builds it."""
    if is_lm_dir(source):
        config = AutoConfig.from_pretrained(resolve_lm_name(source), local_files_only=True)
    else:
        config = lm_config(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def plan_stage2(settings: Stage2Settings, cfg: TrainConfig, processes: int = 1, samples: int | None = None,
                recipe: str | None = None, target: Target = "cuda", tokenizer=None,
                caption_tokens: int | None = None) -> CostPlan:
    """The cost of a stage-2 run with these settings: T (from ``settings.decoder``), the encoder and the LM as
    architectures only. ``tokenizer``: for a random-init LM config (its ids are not read)."""
    text_encoder = meta_text_encoder(settings.decoder)
    encoder = meta_stage2_encoder(settings.encoder, text_encoder.config.hidden_size)
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, lm=settings.lm, trainable=settings.trainable,
                             max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                             lora_rank=settings.lora_rank)
    with torch.device("meta"):
        captioner = Captioner(config, text_encoder, encoder, lm=meta_lm(settings.lm),
                              tokenizer=tokenizer if tokenizer is not None else load_tokenizer(settings.lm))
    return plan_stage2_models(captioner, settings, cfg, processes, samples, recipe, target, caption_tokens)


def plan_stage2_models(captioner: Captioner, settings: Stage2Settings, cfg: TrainConfig, processes: int = 1,
                       samples: int | None = None, recipe: str | None = None, target: Target = "cuda",
                       caption_tokens: int | None = None) -> CostPlan:
    """The cost of a stage-2 run of this meta captioner, its captions at ``caption_tokens`` tokens + EOS (default
    the longest a step trains on, ``max_new_tokens``)."""
    if settings.gradient_checkpointing:  # as build_captioner does
        captioner.lm.activation_checkpointing_enable()
    cached = settings.caches_text_embeds
    b, length = cfg.batch_size, caption_tokens or settings.max_new_tokens
    nq, side, d_t = captioner.encoder.config.num_queries, captioner.encoder.config.image_size, captioner.config.text_dim

    def batch() -> dict[str, torch.Tensor]:  # as Stage2Task.batch makes it
        out = {"input_ids": torch.zeros(b, length, dtype=torch.long),
               "attention_mask": torch.ones(b, length, dtype=torch.long)}
        if cached:
            out["text_embeds"] = torch.empty(b, nq, d_t)  # (B, Nq, d_T)
        else:
            out["pixel_values"] = torch.empty(b, 3, side, side)  # (B, 3, S, S)
        return out

    step = _Step(_fake_mode(captioner), [captioner], captioner, batch,
                 lambda model, x: stage2_loss(model, x).mean, methods=("generate_ids",))
    caches = [] if captioner.encoder_trains else [
        CacheSize("text_embeds", nq * d_t * _itemsize("text_embeds") + 1, cached, samples)]
    plan = _plan("stage2", recipe, step, cfg, processes, target, caches, samples, settings.gradient_checkpointing)
    plan.caption_tokens = length
    return plan


# ----------------------------------------------------------------------------------------------- precompute
def plan_precompute(kind: str, decoder: str | Path | dict, image_size: int | None = None,
                    batch_size: int | None = None, encoder: str | EncoderConfig | None = None,
                    precision: str = "no") -> CostPlan:
    """The memory of ``vlv precompute``: one no-grad forward of the frozen model over a batch, as the cache's rows
    are made (the VAE's encoder for latents; the encoder's vision tower for vision; the encoder then the decoder's
    T for text_embeds). ``encoder``: a stage-1 run dir, a named encoder or Florence-2 dir, or its config."""
    b = batch_size or CACHE_BATCH_SIZE[kind]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if kind == "latents":
        dec = meta_decoder(decoder)
        parts: list[nn.Module] = [dec.vae]
        size = image_size or dec.image_size

        def forward() -> torch.Tensor:
            return dec.vae.encode(torch.empty(b, 3, size, size)).latent_dist.mean
    else:
        text_encoder = meta_text_encoder(decoder)
        if isinstance(encoder, EncoderConfig):
            vlv_encoder = meta_encoder(encoder)
        else:
            vlv_encoder = meta_stage2_encoder(str(encoder), text_encoder.config.hidden_size)
        size = vlv_encoder.config.image_size
        if kind == "vision":
            parts = [vlv_encoder]

            def forward() -> torch.Tensor:
                return vlv_encoder.image_features(torch.empty(b, 3, size, size))
        else:
            parts = [vlv_encoder, text_encoder]

            def forward() -> torch.Tensor:
                z = vlv_encoder(torch.empty(b, 3, size, size))  # (B, Nq, d_T)
                return encode_embeds(text_encoder, z)
    parameters = _parameters(parts)[0]
    for part in parts:
        _to_fake(part, mode)
        part.eval()
    tracker = _StepMemory()
    tracker.track_external(*parts)
    with mode, tracker, _Flops() as counter, torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        forward()
    peak = sum(s[_TOTAL_KEY] for s in tracker.get_tracker_snapshot("peak").values())
    weights = sum(_global_bytes(t) for part in parts for t in [*part.parameters(), *part.buffers()])
    memory = Memory(weights=weights, gradients=0, optimizer=0, activations=peak - weights)
    return CostPlan(f"precompute {kind}", None, 1, "ddp", "bf16" if precision == "bf16" else "fp32", b, 1,
                    parameters, 0, memory, counter.get_total_flops() / b, 0, 0, [])


# ------------------------------------------------------------------------------------------------- recipes
def recipe_task(name_or_file: str) -> str:
    """The task of a recipe named ``task/name``, by a name unique across tasks, or by a file's ``task`` key."""
    if "/" in str(name_or_file) and (RECIPES / f"{name_or_file}.json").is_file():
        return str(name_or_file).split("/")[0]
    tasks = [t for t in ("stage1", "stage2") if name_or_file in list_recipes(t)]
    if len(tasks) == 1:
        return tasks[0]
    if tasks:
        names = " or ".join(f"{t}/{name_or_file}" for t in tasks)
        raise InvalidInput(f"--recipe {name_or_file}: both stages have one; name it {names}")
    if Path(name_or_file).is_file():
        try:
            task = json.loads(Path(name_or_file).read_text()).get("task")
        except (json.JSONDecodeError, AttributeError):
            raise InvalidInput(f"--recipe {name_or_file}: not a JSON recipe") from None
        if task in ("stage1", "stage2"):
            return task
        raise InvalidInput(f"--recipe {name_or_file}: a {task} recipe; plans are made of stage1 and stage2 runs")
    raise InvalidInput(f"no stage1 or stage2 recipe {name_or_file!r}: one of "
                       f"{', '.join(f'stage1/{n}' for n in list_recipes('stage1'))}, "
                       f"{', '.join(f'stage2/{n}' for n in list_recipes('stage2'))} or a JSON file")


def plan_recipe(name_or_file: str, processes: int = 1, samples: int | None = None,
                settings: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                target: Target = "cuda", tokenizer=None, caption_tokens: int | None = None) -> CostPlan:
    """``vlv plan``: a recipe's run on ``processes`` processes, ``settings`` / ``train`` fields on top. Its
    sources default to the paper's architectures (decoder sd21-base; stage 2: encoder florence2-large as stage 1
    trains it, LM qwen2.5-3b)."""
    task = recipe_task(name_or_file)
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    if task == "stage1":
        required = {"decoder": given.pop("decoder", DEFAULT_DECODER), "data": given.pop("data", "")}
        recipe, s, cfg = load_sections(name_or_file, task, Stage1Settings, {**given, **required}, train)
        return plan_stage1(s, cfg, processes, samples=samples, recipe=recipe["name"], target=target)
    required = {"decoder": given.pop("decoder", DEFAULT_DECODER), "data": given.pop("data", ""),
                "encoder": given.pop("encoder", DEFAULT_STAGE2_ENCODER), "lm": given.pop("lm", DEFAULT_LM)}
    recipe, s, cfg = load_sections(name_or_file, task, Stage2Settings, {**given, **required}, train)
    return plan_stage2(s, cfg, processes, samples=samples, recipe=recipe["name"], target=target, tokenizer=tokenizer,
                       caption_tokens=caption_tokens)
