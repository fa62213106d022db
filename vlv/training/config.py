"""The settings of training, as dataclasses whose fields carry their help text: the loop's (:class:`TrainConfig`)
and each task's. Recipes fill them, flags override single fields, run dirs record them. No torch is imported
here, so the command line builds its flags from these fields at once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from vlv.config import TRAINABLE_LEVELS, CaptionerConfig, EncoderConfig, check_lora


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text: the CLI builds its flags from these (one declaration per setting)."""
    return field(default=default, metadata={"help": help, **meta})


def _from(config: type, name: str, note: str = "", **meta: Any) -> Any:
    """A setting that is a field of a model config: its default and help come from there, so the meaning is
    declared once (``note`` adds what only training needs to say)."""
    source = next(f for f in fields(config) if f.name == name)
    default = source.default if source.default is not MISSING else source.default_factory()
    return _f(default, source.metadata["help"] + (f"; {note}" if note else ""), **meta)


def _check_data(num_workers: int, on_bad_image: str) -> None:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be skip or fail, got {on_bad_image!r}")


@dataclass
class TrainConfig:
    """How the loop trains: optimiser, schedule, precision, and when it logs, evaluates, checkpoints and stops."""

    steps: int | None = _f(1000, "optimiser steps (none: a budgeted run plans its own; a budget overrides it)",
                           moot_with="budget_minutes")
    batch_size: int = _f(64, "batch size per process (per micro-step with --grad-accum)")
    grad_accum: int = _f(1, "gradient accumulation: micro-batches per optimiser step, so a global batch of "
                            "batch_size x processes x grad_accum fits fewer GPUs")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "decay after warm-up")
    min_lr_ratio: float = _f(0.0, "cosine / linear decay to lr * this")
    mixed_precision: Literal["no", "bf16"] = _f("no", "fp32 (paper) or bf16 autocast", flag="--precision")
    sharding: Literal["ddp", "fsdp2", "zero2"] = _f(
        "ddp", "ddp: every process holds all trainable weights; fsdp2: weights, gradients and optimizer state "
               "sharded over the processes (FSDP2, for stage 2's LLM); zero2: the same, but weights stay gathered "
               "from forward to backward (ZeRO-2's trade: less communication, more memory)")
    ema_decay: float | None = _f(None, "keep an EMA of the weights with this decay (none: no EMA)")
    checkpoint_every: int = _f(500, "checkpoint every this many steps")
    checkpoint_minutes: float = _f(5.0, "also checkpoint at least this often")
    timeout_minutes: float = _f(60.0, "how long a process waits for the others at a collective (the largest save, "
                                      "a slow data shard) before the run fails")
    export_every: int = _f(0, "write a loadable encoder / captioner dir to RUN/exports/step_N every this many steps "
                              "(0: only the final one)")
    eval_every: int = _f(0, "steps between evaluations (0: never)")
    log_every: int = _f(10, "steps between loss records")
    report_to: Literal["none", "tensorboard"] = _f(
        "none", "also send loss, lr, throughput and evaluations (with their sample images and captions) to this "
                "tracker, through accelerate, into RUN/logs (tensorboard: pip install 'vlv[tracking]')")
    max_minutes: float | None = _f(None, "stop (with a checkpoint, resumably) after this long in this invocation",
                                   flag="--minutes")
    budget_minutes: float | None = _f(None, "plan the step count (and the schedule) to fill this wall time; "
                                            "overrides --steps")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this many steps in this invocation")
    seed: int = _f(0, "seed of the batches, the noise and the random init")
    resume: Literal["check", "override"] = _f(
        "check", "check: a run dir with a checkpoint resumes only with the settings it was started with (the "
                 "differing ones are named); override: resume with these settings anyway")
    progress: bool = _f(True, "progress bar", cli=False)

    def __post_init__(self) -> None:
        if self.steps is None and self.budget_minutes is None:
            raise ValueError("steps: none needs budget_minutes (a budgeted run plans its own step count)")
        if (self.steps is not None and self.steps <= 0) or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("steps, batch_size and grad_accum must be positive")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.timeout_minutes > 0:
            raise ValueError(f"timeout_minutes must be positive, got {self.timeout_minutes}")
        if self.export_every < 0:
            raise ValueError(f"export_every must be >= 0, got {self.export_every}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.resume not in ("check", "override"):
            raise ValueError(f"resume must be check or override, got {self.resume!r}")
        if self.sharding not in ("ddp", "fsdp2", "zero2"):
            raise ValueError(f"sharding must be ddp, fsdp2 or zero2, got {self.sharding!r}")
        if self.sharding != "ddp" and self.ema_decay:
            raise ValueError("EMA is not kept under sharded training (--sharding fsdp2/zero2): drop --ema-decay")
        if self.report_to not in ("none", "tensorboard"):
            raise ValueError(f"report_to must be none or tensorboard, got {self.report_to!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be positive, got {self.budget_minutes}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class Stage1Settings:
    """What a stage-1 run is made from; saved in stage1.json so the run dir describes itself.

    ``decoder`` and ``data`` name the run's inputs; the other fields are the method's settings, which a recipe
    (``vlv/recipes/stage1/*.json``, section ``settings``) fixes and flags override one by one.
    """

    decoder: str = field(metadata={"help": "diffusers dir (SD2/3/XL, FLUX) or shipped name (shapes-teacher)"})
    data: str = field(metadata={"help": "image(-caption) folder, tar shards (a dir, or data/{00000..00099}.tar) or "
                                        "parquet; captions are not used"})
    encoder: str = field(default="florence2-large", metadata={
        "help": "named encoder config (vlv/configs/encoder-*.json: florence2-large, shapes) or a local Florence-2 dir"})
    num_queries: int = _from(EncoderConfig, "num_queries", flag="--nq")
    trainable: str = field(default="config", metadata={
        "help": "config: the encoder config's own set; official: queries + phi + Florence's language model; "
                "all: everything", "choices": ("config", "official", "all")})
    image_size: int | None = field(default=None, metadata={"help": "data resolution; none: the decoder's"})
    cache_latents: bool = field(default=True, metadata={
        "help": "cache the frozen VAE's posteriors once (--no-cache-latents: encode every step)"})
    cache_vision: bool = field(default=False, metadata={
        "help": "cache the frozen vision tower's features once, so no step runs the DaViT (disk: Nv x D fp16 "
                "per image); needs a frozen vision tower"})
    latents_cache: str | None = field(default=None, metadata={
        "help": "a latents cache made by vlv precompute latents (instead of one in the run dir); refused unless "
                "made from this decoder, data and resolution"})
    vision_cache: str | None = field(default=None, metadata={
        "help": "a vision cache made by vlv precompute vision (instead of one in the run dir); refused unless "
                "made from this encoder's vision tower, data and resolution"})
    num_workers: int = field(default=2, metadata={
        "help": "DataLoader workers decoding images (0: on the training thread); batches do not depend on it"})
    image_column: str = field(default="image", metadata={"help": "parquet data: the image column"})
    caption_column: str = field(default="caption", metadata={"help": "parquet data: the caption column"})
    on_bad_image: Literal["skip", "fail"] = field(default="skip", metadata={
        "help": "an unreadable image: skip it (counted in the run dir's data.json) or stop naming it"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations"})
    high_noise_fraction: float = field(default=0.0, metadata={
        "help": "share of timesteps drawn from the upper (layout-deciding) half; 0 = the paper's uniform t"})
    init: str | None = field(default=None, metadata={
        "help": "start from this stage-1 run's (or shipped name's) encoder weights with a fresh optimizer and "
                "schedule (same architecture; a smaller --nq takes its first Nq queries)"})
    phi_init_gain: float | None = _from(EncoderConfig, "phi_init_gain", "a recipe's value does not apply with --init",
                                        moot_with="init")

    def __post_init__(self) -> None:
        _check_data(self.num_workers, self.on_bad_image)
        if self.trainable not in ("config", "official", "all"):
            raise ValueError(f"trainable must be config, official or all, got {self.trainable!r}")
        if not 0.0 <= self.high_noise_fraction <= 1.0:
            raise ValueError(f"high_noise_fraction must be in [0, 1], got {self.high_noise_fraction}")
        if self.phi_init_gain is not None and self.phi_init_gain <= 0:
            raise ValueError(f"phi_init_gain must be positive, got {self.phi_init_gain}")


@dataclass
class Stage2Settings:
    """What a stage-2 run is made from; saved in stage2.json so the run dir describes itself.

    ``encoder``, ``lm``, ``data`` and ``decoder`` name the run's inputs; the other fields are the method's
    settings, which a recipe (``vlv/recipes/stage2/*.json``, section ``settings``) fixes and flags override.
    ``prepare_stage2`` fills ``decoder`` and ``image_size`` from the stage-1 run when they are not given.
    """

    encoder: str = field(metadata={"help": "stage-1 run dir (never modified) or shipped name (shapes-stage1)"})
    lm: str = field(metadata={"help": "causal LM dir (vlv train lm output, a local Qwen2.5 dir), an LM config "
                                      "(random init) or the shipped shapes-lm"})
    data: str = field(metadata={"help": "image-caption folder, tar shards or parquet (with captions)"})
    decoder: str | None = field(default=None, metadata={
        "help": "diffusers dir (SD2/3/XL, FLUX) or shipped name whose text encoder T the stage-1 run trained against "
                "(only T is loaded); none: the stage-1 run's own (its stage1.json; an imported run needs it given); "
                "another one is refused"})
    image_size: int | None = field(default=None, metadata={
        "help": "data resolution (the encoder resizes to its own size); none: the stage-1 run's, else the "
                "encoder's"})
    trainable: str = _from(CaptionerConfig, "trainable", choices=TRAINABLE_LEVELS)
    lora_rank: int = _from(CaptionerConfig, "lora_rank")
    max_new_tokens: int = _from(CaptionerConfig, "max_new_tokens")
    num_beams: int = _from(CaptionerConfig, "num_beams")
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute the LLM's activations"})
    num_workers: int = field(default=2, metadata={
        "help": "DataLoader workers decoding images (0: on the training thread); batches do not depend on it"})
    image_column: str = field(default="image", metadata={"help": "parquet data: the image column"})
    caption_column: str = field(default="caption", metadata={"help": "parquet data: the caption column"})
    on_bad_image: Literal["skip", "fail"] = field(default="skip", metadata={
        "help": "an unreadable image: skip it (counted in the run dir's data.json) or stop naming it"})
    cache_text_embeds: bool | None = field(default=None, metadata={
        "help": "cache c = T(E(x)) per image once (the run dir's text_embeds/, Nq x d_T fp32 per image), so no step "
                "decodes an image or runs the frozen encoder and T; none: on at the levels that freeze the "
                "encoder (mlp, mlp+llm)"})
    text_embeds_cache: str | None = field(default=None, metadata={
        "help": "the text_embeds/ cache of another stage-2 run, instead of one in this run dir; refused unless made "
                "from this encoder, T, data, resolution and precision"})

    def __post_init__(self) -> None:
        _check_data(self.num_workers, self.on_bad_image)
        check_lora(self.trainable, self.lora_rank)  # before anything loads: a bad flag fails at once
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @property
    def caches_text_embeds(self) -> bool:
        """Whether the run reads c = T(E(x)) from a cache (checked against the level by ``prepare_stage2``)."""
        if self.text_embeds_cache is not None:
            return True
        return self.cache_text_embeds if self.cache_text_embeds is not None else self.trainable != "mlp+llm+encoder"


@dataclass
class LMSettings:
    """What an LM pre-training run was made from; saved as lm.json next to the LM."""

    data: str = field(metadata={"help": "image-caption folder; only captions.jsonl is read"})
    lm: str = field(default="qwen2-shapes", metadata={
        "help": "LM config stem (random init) or a local LM dir to continue from"})
    val: str | None = field(default=None, metadata={"help": "held-out folder: its captions' token loss"})
    eval_n: int = field(default=200, metadata={"help": "held-out captions read"})
