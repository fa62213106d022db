"""The shapes teacher's architecture (:class:`TeacherConfig`) and recipe (:class:`TeacherRecipe`: its settings and
one loop config per phase), apart from the models so that the command line reads their fields without importing
torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlv.errors import InvalidInput
from vlv.training.config import TrainConfig


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


# Loop fields that are the whole teacher's, not a phase's: one seed for the run (section ``settings``); the
# time limit, resume policy and progress bar come from the command; it reports to no tracker. Neither a phase
# section nor a flag sets them.
TEACHER_OWNED = ("seed", "max_minutes", "budget_minutes", "progress", "resume", "report_to")
PHASES = ("vae", "unet")


@dataclass
class TeacherSettings:
    """The teacher's own method settings (recipe section ``settings``); each phase's loop is a TrainConfig."""

    caption_dropout: float = _f(0.1, "share of empty captions, for classifier-free guidance")
    high_noise_fraction: float = _f(0.25, "share of timesteps drawn from the upper (layout) half")
    eval_n: int = _f(200, "held-out scenes per evaluation")
    eval_guidance: tuple[float, ...] = _f((2.0, 4.0), "guidance scales evaluated")
    seed: int = _f(0, "seed of the init and of both phases' batches and noise")

    def __post_init__(self) -> None:
        """Refused here, before data load, not once a phase starts."""
        if not self.eval_n > 0:
            raise InvalidInput(f"eval_n must be positive, got {self.eval_n}")
        if bad := [f for f in ("caption_dropout", "high_noise_fraction") if not 0.0 <= getattr(self, f) <= 1.0]:
            raise InvalidInput(f"{', '.join(bad)} must be in [0, 1]")
        self.eval_guidance = tuple(self.eval_guidance)


@dataclass
class TeacherRecipe:
    """How a teacher is trained (``vlv/recipes/teacher/*.json``): its settings, then one loop per phase: the VAE
    (section ``vae``), then the text encoder + UNet on cached latents (section ``unet``)."""

    settings: TeacherSettings
    vae: TrainConfig
    unet: TrainConfig
    name: str | None = None  # the recipe it came from, for the record

    def __post_init__(self) -> None:
        for phase in PHASES:
            cfg = getattr(self, phase)
            if cfg.steps is None or cfg.budget_minutes is not None:
                raise InvalidInput(f"{phase}: a teacher phase trains a fixed number of steps (no budget_minutes)")
            if not 0.0 <= cfg.min_lr_ratio <= 1.0 or cfg.eval_every < 0:
                raise InvalidInput(f"{phase}: min_lr_ratio must be in [0, 1] and eval_every >= 0")
            setattr(self, phase, replace(cfg, seed=self.settings.seed))  # the run's one seed
        if self.unet.ema_decay is None:
            raise InvalidInput("unet.ema_decay: the teacher exports the UNet's EMA weights, so its loop keeps one")

    def record(self) -> dict[str, dict[str, Any]]:
        """The sections as they run, as a run dir records (and a resume compares) them."""
        return {"settings": asdict(self.settings), **{p: asdict(getattr(self, p)) for p in PHASES}}


def teacher_recipe(name_or_file: str | Path = "shapes", settings: dict[str, Any] | None = None,
                   vae: dict[str, Any] | None = None, unet: dict[str, Any] | None = None) -> TeacherRecipe:
    """A teacher recipe (name in ``vlv/recipes/teacher/`` or file) with the given fields of each section on top."""
    from vlv.training.recipes import load_recipe, section, user_input

    with user_input():
        recipe = load_recipe(name_or_file, "teacher")
        if extra := sorted(set(recipe) - {"name", "task", "description", "settings", *PHASES}):
            raise ValueError(f"recipe {recipe['name']!r}: unknown sections {', '.join(extra)} (a teacher recipe "
                             "has settings, vae and unet)")
        for phase in PHASES:
            if owned := sorted(set(recipe.get(phase, {})) & set(TEACHER_OWNED)):
                raise ValueError(f"recipe {recipe['name']!r}, section {phase!r}: {', '.join(owned)} is not a "
                                 "phase's (the seed is in section 'settings'; the rest are the command's)")
        given = {"vae": vae, "unet": unet}
        return TeacherRecipe(section(recipe, "settings", TeacherSettings, settings),
                             *(section(recipe, p, TrainConfig, given[p]) for p in PHASES), name=recipe["name"])


@dataclass
class DetectionSettings:
    """What a shapes Florence-2 pre-training run is made from (``vlv train florence2``); saved beside it."""

    data: str = field(metadata={"help": "shapes folder (vlv data shapes): its scenes give the boxes and labels"})
    val: str | None = _f(None, "held-out shapes folder: greedy detection accuracy at each evaluation")
    eval_n: int = _f(200, "held-out scenes per evaluation")
    architecture: str = _f("florence2-shapes", "Florence-2 architecture config (vlv/configs); the vocabulary is "
                                               "sized to the detection tokens")
