"""The shapes teacher's architecture (:class:`TeacherConfig`) and recipe (:class:`TeacherRecipe`), apart from the
models so that the command line reads their fields without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlv.errors import InvalidInput


@dataclass
class TeacherConfig:
    """Architecture of a shapes teacher. Serialised next to its weights (teacher.json)."""

    image_size: int = 64
    # VAE: len(vae_channels) - 1 downsamplings, so 64 px -> 16x16 latents with three blocks.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 16
    latent_channels: int = 4
    # Text encoder (CLIPTextModel).
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 77  # SD's; stage 1's Nq can be anything up to it
    # UNet.
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    unet_cross_attention: tuple[bool, ...] = (False, True, True)  # per resolution, high to low
    unet_heads: int = 4
    # Diffusion.
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self) -> None:
        self.vae_channels, self.unet_channels = tuple(self.vae_channels), tuple(self.unet_channels)
        self.unet_cross_attention = tuple(self.unet_cross_attention)
        if len(self.unet_cross_attention) != len(self.unet_channels):
            raise ValueError("unet_cross_attention needs one flag per UNet resolution")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


TINY = TeacherConfig(vae_channels=(8, 16, 16), vae_norm_groups=4, text_hidden=32, text_layers=1, text_heads=2,
                     unet_channels=(16, 32), unet_cross_attention=(False, True), unet_heads=2)


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TeacherRecipe:
    """How a teacher is trained: both phases' loop settings (``vlv/recipes/shapes-teacher.json``)."""

    vae_steps: int = _f(2000, "VAE steps (phase 1)")
    vae_batch: int = _f(32, "VAE batch size")
    vae_lr: float = _f(2e-3, "VAE learning rate")
    vae_warmup: int = _f(100, "phase-1 warm-up steps")
    vae_min_lr_ratio: float = _f(0.1, "phase-1 cosine decays to lr * this")
    unet_steps: int = _f(15000, "text encoder + UNet steps (phase 2)")
    unet_batch: int = _f(64, "text encoder + UNet batch size")
    unet_lr: float = _f(1e-3, "text encoder + UNet learning rate")
    unet_warmup: int = _f(200, "phase-2 warm-up steps")
    unet_min_lr_ratio: float = _f(0.05, "phase-2 cosine decays to lr * this")
    ema_decay: float = _f(0.999, "EMA decay of the exported phase-2 weights")
    caption_dropout: float = _f(0.1, "share of empty captions, for classifier-free guidance")
    high_noise_fraction: float = _f(0.25, "share of timesteps drawn from the upper (layout) half")
    eval_every: int = _f(1000, "phase-2 steps between held-out samples (with --val)")
    vae_eval_every: int = _f(250, "phase-1 steps between held-out VAE reconstructions (with --val)")
    eval_n: int = _f(200, "held-out scenes per evaluation")
    eval_guidance: tuple[float, ...] = _f((2.0, 4.0), "guidance scales evaluated")
    seed: int = _f(0, "seed")
    checkpoint_every: int = _f(500, "steps between checkpoints of each phase (also every 5 minutes)")
    extra: dict = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        """Refused here, before data load: each phase's loop would refuse it only once the phase starts."""
        positive = ("vae_steps", "vae_batch", "vae_lr", "unet_steps", "unet_batch", "unet_lr", "eval_n")
        if bad := [f for f in positive if not getattr(self, f) > 0]:
            raise InvalidInput(f"{', '.join(bad)} must be positive, got "
                               f"{', '.join(str(getattr(self, f)) for f in bad)}")
        if bad := [f for f in ("vae_warmup", "unet_warmup", "eval_every", "vae_eval_every") if getattr(self, f) < 0]:
            raise InvalidInput(f"{', '.join(bad)} must be >= 0")
        shares = ("vae_min_lr_ratio", "unet_min_lr_ratio", "caption_dropout", "high_noise_fraction")
        if bad := [f for f in shares if not 0.0 <= getattr(self, f) <= 1.0]:
            raise InvalidInput(f"{', '.join(bad)} must be in [0, 1]")
        if not 0.0 < self.ema_decay < 1.0:
            raise InvalidInput(f"ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class DetectionSettings:
    """What a shapes Florence-2 pre-training run is made from (``vlv train florence2``); saved beside it."""

    data: str = field(metadata={"help": "shapes folder (vlv data shapes): its scenes give the boxes and labels"})
    val: str | None = _f(None, "held-out shapes folder: greedy detection accuracy at each evaluation")
    eval_n: int = _f(200, "held-out scenes per evaluation")
    architecture: str = _f("florence2-shapes", "Florence-2 architecture config (vlv/configs); the vocabulary is "
                                               "sized to the detection tokens")
