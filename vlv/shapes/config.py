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
        if recipe.get("layout", "sd2") != "sd2":
            raise ValueError(f"recipe {recipe['name']!r} trains the {recipe['layout']} layout (--layout "
                             f"{recipe['layout']})")
        if extra := sorted(set(recipe) - {"name", "task", "description", "layout", "settings", *PHASES}):
            raise ValueError(f"recipe {recipe['name']!r}: unknown sections {', '.join(extra)} (a teacher recipe "
                             "has settings, vae and unet)")
        for phase in PHASES:
            if owned := sorted(set(recipe.get(phase, {})) & set(TEACHER_OWNED)):
                raise ValueError(f"recipe {recipe['name']!r}, section {phase!r}: {', '.join(owned)} is not a "
                                 "phase's (the seed is in section 'settings'; the rest are the command's)")
        given = {"vae": vae, "unet": unet}
        return TeacherRecipe(section(recipe, "settings", TeacherSettings, settings),
                             *(section(recipe, p, TrainConfig, given[p]) for p in PHASES), name=recipe["name"])


# ------------------------------------------------------------------------------------- the SD3-layout teacher
LAYOUTS = ("sd2", "sd3")  # the teacher's pipeline: StableDiffusionPipeline (UNet) or StableDiffusion3Pipeline
SD3_PHASES = ("transformer",)


@dataclass
class SD3TeacherConfig:
    """Architecture of a shapes teacher in the SD3 layout (teacher.json). The VAE and the tokenizer are an SD-layout
    teacher's (``source``), reused frozen; the two CLIPs and the transformer are new."""

    source: str = "shapes-teacher"  # SD-layout teacher dir or shipped name: its VAE and tokenizer
    # The two CLIPTextModelWithProjection (SD3's CLIP-L and CLIP-G), each with the shipped tokenizer.
    text_hidden: tuple[int, int] = (64, 128)
    text_layers: tuple[int, int] = (3, 3)
    text_heads: tuple[int, int] = (2, 4)
    max_length: int = 77  # the tokenizer's; stage 1's Nq can be anything up to it
    # SD3Transformer2DModel.
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    joint_attention_dim: int = 256  # >= the CLIPs' summed width; the pipeline zero-pads their states to it
    qk_norm: str | None = "rms_norm"
    # FlowMatchEulerDiscreteScheduler.
    shift: float = 3.0
    # The T5 part: no T5 (text_encoder_3 None), so the stock pipeline appends this many zero tokens (its default
    # max_sequence_length); the transformer trains on the same context.
    t5_tokens: int = 256

    def __post_init__(self) -> None:
        self.text_hidden, self.text_layers = tuple(self.text_hidden), tuple(self.text_layers)
        self.text_heads = tuple(self.text_heads)
        if not len(self.text_hidden) == len(self.text_layers) == len(self.text_heads) == 2:
            raise InvalidInput("text_hidden, text_layers and text_heads: two values each, one per CLIP")
        if min(self.text_layers) < 2:
            raise InvalidInput("text_layers: the pipeline reads each CLIP's penultimate layer, so two layers at least")
        if self.joint_attention_dim < sum(self.text_hidden):
            raise InvalidInput(f"joint_attention_dim {self.joint_attention_dim} < the CLIPs' summed width "
                               f"{sum(self.text_hidden)}")
        if self.t5_tokens < 1:
            raise InvalidInput("t5_tokens must be positive")

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def pooled_dim(self) -> int:
        """Each CLIP's projection is as wide as the CLIP (SD3's are too); the transformer reads them concatenated."""
        return sum(self.text_hidden)


TINY_SD3 = SD3TeacherConfig(text_hidden=(16, 32), text_layers=(2, 2), text_heads=(2, 2), layers=2, heads=2,
                            head_dim=8, joint_attention_dim=64)


@dataclass
class SD3TeacherSettings:
    """The SD3-layout teacher's method settings (recipe section ``settings``); its one loop is section
    ``transformer``."""

    caption_dropout: float = _f(0.1, "share of empty captions, for classifier-free guidance")
    weighting_scheme: str = _f("logit_normal", "timestep density / loss weighting (diffusers' SD3 schemes: "
                                               "logit_normal, mode, uniform, sigma_sqrt, cosmap)")
    logit_mean: float = _f(0.0, "logit_normal: mean of the logit of u")
    logit_std: float = _f(1.0, "logit_normal: std of the logit of u")
    eval_n: int = _f(200, "held-out scenes per evaluation")
    eval_guidance: tuple[float, ...] = _f((2.0, 4.0), "guidance scales evaluated")
    eval_steps: int = _f(28, "FlowMatchEuler steps of an evaluation's samples")
    seed: int = _f(0, "seed of the init, the batches and the noise")

    def __post_init__(self) -> None:
        """Refused here, before data load."""
        if not self.eval_n > 0 or not self.eval_steps > 0:
            raise InvalidInput("eval_n and eval_steps must be positive")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise InvalidInput("caption_dropout must be in [0, 1]")
        if self.weighting_scheme not in ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"):
            raise InvalidInput(f"weighting_scheme must be logit_normal, mode, uniform, sigma_sqrt or cosmap, got "
                               f"{self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise InvalidInput("logit_std must be positive")
        self.eval_guidance = tuple(self.eval_guidance)


@dataclass
class SD3TeacherRecipe:
    """How an SD3-layout teacher trains (``vlv/recipes/teacher/shapes-sd3.json``, ``"layout": "sd3"``): its settings
    and the loop of its one phase (section ``transformer``: the two CLIPs and the transformer, jointly)."""

    settings: SD3TeacherSettings
    transformer: TrainConfig
    name: str | None = None

    def __post_init__(self) -> None:
        cfg = self.transformer
        if cfg.steps is None or cfg.budget_minutes is not None:
            raise InvalidInput("transformer: a teacher phase trains a fixed number of steps (no budget_minutes)")
        if cfg.ema_decay is None:
            raise InvalidInput("transformer.ema_decay: the teacher exports EMA weights, so its loop keeps one")
        if cfg.eval_every < 0:
            raise InvalidInput("transformer: eval_every must be >= 0")
        self.transformer = replace(cfg, seed=self.settings.seed)

    def record(self) -> dict[str, dict[str, Any]]:
        return {"settings": asdict(self.settings), "transformer": asdict(self.transformer)}


def recipe_layout(name_or_file: str | Path) -> str:
    """The layout a teacher recipe trains (its ``layout`` key; none: sd2, the first teacher's)."""
    from vlv.training.recipes import load_recipe, user_input

    with user_input():
        layout = load_recipe(name_or_file, "teacher").get("layout", "sd2")
        if layout not in LAYOUTS:
            raise ValueError(f"teacher recipe {name_or_file}: layout must be one of {', '.join(LAYOUTS)}, "
                             f"got {layout!r}")
    return layout


def sd3_teacher_recipe(name_or_file: str | Path = "shapes-sd3", settings: dict[str, Any] | None = None,
                       transformer: dict[str, Any] | None = None) -> SD3TeacherRecipe:
    """An SD3-layout teacher recipe (name in ``vlv/recipes/teacher/`` or file), the given fields on top."""
    from vlv.training.recipes import load_recipe, section, user_input

    with user_input():
        recipe = load_recipe(name_or_file, "teacher")
        if recipe.get("layout") != "sd3":
            raise ValueError(f"recipe {recipe['name']!r} trains the {recipe.get('layout', 'sd2')} layout, not sd3")
        if extra := sorted(set(recipe) - {"name", "task", "description", "layout", "settings", *SD3_PHASES}):
            raise ValueError(f"recipe {recipe['name']!r}: unknown sections {', '.join(extra)} (an sd3 teacher recipe "
                             "has settings and transformer)")
        if owned := sorted(set(recipe.get("transformer", {})) & set(TEACHER_OWNED)):
            raise ValueError(f"recipe {recipe['name']!r}, section 'transformer': {', '.join(owned)} is not a "
                             "phase's (the seed is in section 'settings'; the rest are the command's)")
        return SD3TeacherRecipe(section(recipe, "settings", SD3TeacherSettings, settings),
                                section(recipe, "transformer", TrainConfig, transformer), name=recipe["name"])


@dataclass
class DetectionSettings:
    """What a shapes Florence-2 pre-training run is made from (``vlv train florence2``); saved beside it."""

    data: str = field(metadata={"help": "shapes folder (vlv data shapes): its scenes give the boxes and labels"})
    val: str | None = _f(None, "held-out shapes folder: greedy detection accuracy at each evaluation")
    eval_n: int = _f(200, "held-out scenes per evaluation")
    architecture: str = _f("florence2-shapes", "Florence-2 architecture config (vlv/configs); the vocabulary is "
                                               "sized to the detection tokens")
