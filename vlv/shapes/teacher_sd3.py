"""The shapes teacher in the SD3 layout: a small ``SD3Transformer2DModel`` trained by flow matching.

Stable Diffusion 3's own classes throughout (``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``, two
``CLIPTextModelWithProjection``, ``AutoencoderKL``), saved by ``StableDiffusion3Pipeline.save_pretrained``: the
dir loads in the stock pipeline with no vlv code. No T5 (``text_encoder_3`` None): the pipeline then appends
``t5_tokens`` zero vectors to the CLIP states, and the transformer trains on exactly that context.

Loading it: ``StableDiffusion3Pipeline.from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)``, diffusers'
own way to run SD3 without its T5 (the pipeline lists T5 as a required component, so a dir whose model_index.json
holds it as null loads only when it is passed as None).

Reused from the first teacher (``source``): its VAE, frozen (4 latent channels, its ``scaling_factor``; the saved
config sets ``shift_factor`` 0, since the SD3 pipeline decodes ``latents / scaling + shift``), and its tokenizer,
as both ``tokenizer`` and ``tokenizer_2``. The task and loop are the first teacher's (:class:`UNetTask`'s batches
and caption dropout, :func:`vlv.training.loop.train`'s checkpoints, EMA, exact resume); the loss is
:func:`vlv.diffusion.flow_matching_loss` (SD3's logit-normal timesteps); the text encoders train with the
transformer, as the first teacher's T trained with its UNet.

Training speed: the pipeline's ``t5_tokens`` zero tokens are identical, so every layer maps them to identical
states; training keeps one of them and adds log(t5_tokens) to its attention logit (``attention_mask``, which the
stock processor ignores and :class:`KeyBiasJointAttnProcessor` applies). That is the same function, computed on
77 + 1 context tokens instead of 77 + 256; evaluation samples through the stock pipeline on the full context.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

from vlv.checks import check_checkpoints, read_json, require_dirs, safetensors_keys
from vlv.data.caches import posteriors_file
from vlv.data.datasets import InMemory
from vlv.data.records import read_captions
from vlv.decoders.sd3 import KeyBiasJointAttnProcessor, repeated_tail_bias
from vlv.diffusion import draw, flow_matching_loss, sample_latents, tokenize
from vlv.errors import InvalidInput
from vlv.modeling import resolve_device, write_json
from vlv.progress import quiet_library
from vlv.shapes import metrics, world
from vlv.shapes.config import SD3TeacherConfig, SD3TeacherRecipe
from vlv.shapes.teacher import UNetTask
from vlv.shipped import resolve_decoder
from vlv.training.checkpoint import ema_by_name, has_checkpoint
from vlv.training.draws import Draws
from vlv.training.loop import Loss, train
from vlv.training.resume import check_resume

PIPELINE = "StableDiffusion3Pipeline"
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DEFAULT_STEPS = 28  # StableDiffusion3Pipeline's num_inference_steps


# ------------------------------------------------------------------------------------------- attention
# ---------------------------------------------------------------------------------------------- models
def build_text_encoders(cfg: SD3TeacherConfig, tokenizer) -> list[CLIPTextModelWithProjection]:
    """SD3's two CLIPs (CLIP-L, CLIP-G), small: each projects its pooled state to its own width."""
    return [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n,
        num_attention_heads=heads, max_position_embeddings=cfg.max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=h))
        for h, n, heads in zip(cfg.text_hidden, cfg.text_layers, cfg.text_heads, strict=True)]


def build_transformer(cfg: SD3TeacherConfig, latent_size: int, latent_channels: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.width, pooled_projection_dim=cfg.pooled_dim,
        pos_embed_max_size=latent_size // cfg.patch_size, qk_norm=cfg.qk_norm)


def build_scheduler(cfg: SD3TeacherConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def source_parts(cfg: SD3TeacherConfig) -> tuple[AutoencoderKL, object]:
    """The source teacher's VAE (fp32, frozen, ``shift_factor`` 0) and tokenizer, checked against the config."""
    path = resolve_decoder(cfg.source)
    with quiet_library():
        vae = AutoencoderKL.from_pretrained(path / "vae", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    if tokenizer.model_max_length != cfg.max_length:
        raise InvalidInput(f"{cfg.source}: its tokenizer's length {tokenizer.model_max_length} is not the config's "
                           f"max_length {cfg.max_length}")
    # The SD3 pipeline decodes latents / scaling + shift; the source VAE's latents are used unshifted.
    vae.register_to_config(shift_factor=0.0)
    return vae.requires_grad_(False).eval(), tokenizer


def latent_geometry(vae: AutoencoderKL) -> tuple[int, int, int]:
    """(image size, latent size, latent channels) of a VAE."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.sample_size, vae.config.sample_size // scale, vae.config.latent_channels


class SD3TextToImage(torch.nn.Module):
    """The two CLIPs and the transformer, trained jointly: one module, so one optimizer and one DDP wrap.

    ``encode`` is ``StableDiffusion3Pipeline.encode_prompt``'s CLIP part: each CLIP's penultimate hidden states,
    concatenated and zero-padded to ``joint_attention_dim``, and its projected pooled state, concatenated.
    ``forward`` appends the pipeline's T5 zeros as one token counted ``t5_tokens`` times (see the module doc).
    """

    def __init__(self, text_encoders: list[CLIPTextModelWithProjection], transformer: SD3Transformer2DModel,
                 t5_tokens: int):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoders
        self.transformer, self.t5_tokens = transformer, t5_tokens
        transformer.set_attn_processor(KeyBiasJointAttnProcessor())

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], []
        for te in (self.text_encoder, self.text_encoder_2):
            out = te(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, L, d_i)
            pooled.append(out.text_embeds)  # (B, p_i)
        clip = torch.cat(states, -1)  # (B, L, sum d_i)
        clip = F.pad(clip, (0, self.transformer.config.joint_attention_dim - clip.shape[-1]))  # (B, L, J)
        return clip, torch.cat(pooled, -1)  # (B, L, J), (B, sum p_i)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        clip, pooled = self.encode(ids)
        context = torch.cat([clip, clip.new_zeros(clip.shape[0], 1, clip.shape[2])], 1)  # (B, L + 1, J)
        n_image = (noisy.shape[-1] // self.transformer.config.patch_size) ** 2
        bias = repeated_tail_bias(n_image + context.shape[1], [math.log(self.t5_tokens)], noisy.device)  # fp32
        return self.transformer(noisy, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                                joint_attention_kwargs={"attention_mask": bias}).sample  # (B, C, h, w)


def make_pipeline(vae: AutoencoderKL, model: SD3TextToImage, tokenizer,
                  scheduler: FlowMatchEulerDiscreteScheduler) -> StableDiffusion3Pipeline:
    """The stock pipeline over these parts (one tokenizer for both CLIPs, no T5), progress bar off."""
    pipe = StableDiffusion3Pipeline(transformer=model.transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=model.text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=model.text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ the task
class FlowTask(UNetTask):
    """The first teacher's UNet task (batches, caption dropout, evaluation) with the flow-matching loss on latents
    encoded as the SD3 pipeline decodes them: (posterior - shift) x scaling."""

    name = "teacher-transformer"

    def __init__(self, model: SD3TextToImage, scheduler: FlowMatchEulerDiscreteScheduler,
                 latents: dict[str, torch.Tensor], ids: torch.Tensor, empty_ids: torch.Tensor, scaling_factor: float,
                 shift_factor: float = 0.0, seed: int = 0, caption_dropout: float = 0.1,
                 weighting: dict | None = None, evaluator=None):
        super().__init__(model, scheduler, latents, ids, empty_ids, scaling_factor, seed=seed,
                         caption_dropout=caption_dropout, evaluator=evaluator)
        self.shift_factor, self.weighting = shift_factor, dict(weighting or {})

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> Loss:
        """The flow-matching loss, a mean over the batch's samples."""
        latents = sample_latents(batch["mean"] - self.shift_factor, batch["std"], self.scaling_factor, draws)
        return Loss(flow_matching_loss(lambda noisy, t: model(noisy, t, batch["ids"]), self.scheduler, latents,
                                       draws, **self.weighting), len(latents))


# ------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(pipe: StableDiffusion3Pipeline, captions: list[str], guidance_scale: float = 2.0,
           steps: int | None = None, seed: int = 0, batch_size: int = 256) -> list:
    """:func:`vlv.diffusion.draw` through the stock pipeline (its FlowMatchEuler scheduler); ``steps`` None: the
    teacher's evaluation count."""
    pipe.set_progress_bar_config(disable=True)
    return draw(pipe, captions, guidance_scale, steps or DEFAULT_STEPS, seed, batch_size)


def sample_accuracy(pipe: StableDiffusion3Pipeline, captions: list[str], **kwargs) -> world.Scores:
    """Text -> image -> detector vs the captions themselves, as ``vlv.shapes.metrics.sample_accuracy``."""
    return metrics.sample_accuracy(pipe, captions, draw=sample, **kwargs)


def is_sd3_dir(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == PIPELINE


def check_sd3_dir(path: str | Path) -> Path:
    """A complete SD3-layout dir: model_index.json names the pipeline and each part vlv loads is there."""
    path = Path(path)
    index = read_json(path / "model_index.json")
    if index.get("_class_name") != PIPELINE:
        raise InvalidInput(f"{path} is not an SD3-layout dir (model_index.json names {index.get('_class_name')!r})")
    missing = [p for p in PARTS if not isinstance(index.get(p), list) or not (path / p).is_dir()]
    if missing:
        raise InvalidInput(f"{path} is an incomplete SD3 dir: no {', '.join(p + '/' for p in missing)}")
    for part in PARTS:
        for f in sorted((path / part).glob("*.safetensors")):
            safetensors_keys(f)
    return path


def load_pipeline(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """An SD3-layout teacher dir in the stock pipeline, frozen, in ``dtype``."""
    path = check_sd3_dir(path)
    with quiet_library():
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, dtype=dtype,
                                                        local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.requires_grad_(False).eval()
    return pipe.to(device)


# ---------------------------------------------------------------------------------------- save / load
def save_teacher(pipe: StableDiffusion3Pipeline, out: Path, cfg: SD3TeacherConfig, record: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """SD3 layout (model_index.json, transformer/, vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/) and
    teacher.json. ``dtype`` applies to the transformer and VAE; the text encoders stay fp32 (see
    ``vlv.shapes.teacher.save_teacher``)."""
    out = Path(out)
    transformer, vae = pipe.transformer, pipe.vae
    if dtype != torch.float32:
        transformer, vae = copy.deepcopy(transformer).to(dtype), copy.deepcopy(vae).to(dtype)
    saved = StableDiffusion3Pipeline(transformer=transformer, scheduler=pipe.scheduler, vae=vae,
                                     text_encoder=pipe.text_encoder.float(), tokenizer=pipe.tokenizer,
                                     text_encoder_2=pipe.text_encoder_2.float(), tokenizer_2=pipe.tokenizer_2,
                                     text_encoder_3=None, tokenizer_3=None)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning that text_encoder_3=None "cannot be saved": no T5 is meant
    try:
        with quiet_library():
            saved.save_pretrained(out, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    write_json(out / "teacher.json", {"layout": "sd3", "config": asdict(cfg),
                                      **({"training": record} if record else {})})
    return out


def _evaluator(vae: AutoencoderKL, tokenizer, scheduler: FlowMatchEulerDiscreteScheduler, captions: list[str],
               guidance: tuple[float, ...], steps: int):
    """Held-out scene accuracy per guidance scale, sampled through the stock pipeline (its own scheduler copy:
    sampling sets timesteps, the loss needs the training schedule)."""

    def evaluate(model: SD3TextToImage) -> dict[str, float]:
        pipe = make_pipeline(vae, model, tokenizer, FlowMatchEulerDiscreteScheduler.from_config(scheduler.config))
        return {f"scene_accuracy_cfg{g:g}": sample_accuracy(pipe, captions, guidance_scale=g, steps=steps)
                .scene_accuracy for g in guidance}

    return evaluate


def train_sd3_teacher(data: Path, out: Path, cfg: SD3TeacherConfig, recipe: SD3TeacherRecipe, val: Path | None = None,
                      max_minutes: float | None = None, progress: bool = True, command: str | None = None,
                      on_bad_image: Literal["skip", "fail"] = "skip", resume_override: bool = False) -> Path | None:
    """Encode the images with the source teacher's VAE (cached), train the two CLIPs + transformer; export the
    SD3 layout into ``out``. Resumable as ``vlv.shapes.teacher.train_teacher``: state in out/training/; None when
    the time ran out first (run it again to continue)."""
    out, work = Path(out), Path(out) / "training"
    require_dirs(data, val)
    for folder in (data, val):
        if folder is not None:
            read_captions(folder)
    check_checkpoints(out)
    check_resume(work, "recipe.json", {"config": asdict(cfg), **recipe.record()}, resume_override,
                 checkpoint_dir=work / "transformer")
    vae, tokenizer = source_parts(cfg)
    vae.to(resolve_device())  # the loop's device: encoding the cache and evaluation's decoding run there
    image_size, latent_size, channels = latent_geometry(vae)
    settings = recipe.settings
    skip = on_bad_image == "skip"
    train_data = InMemory.of(data, image_size, progress=progress, skip_bad=skip)
    test_data = InMemory.of(val, image_size, limit=settings.eval_n, skip_bad=skip) if val else None
    for folder in (train_data, test_data):
        if folder is not None and folder.bad:
            print(f"[teacher] {len(folder.bad)} unreadable image(s) skipped (first {folder.bad[0]})")
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "recipe.json", {"layout": "sd3", "config": asdict(cfg), "name": recipe.name,
                                      **recipe.record()})
    torch.manual_seed(settings.seed)

    latents = posteriors_file(vae, train_data, work / "latents.safetensors", batch_size=256)
    model = SD3TextToImage(build_text_encoders(cfg, tokenizer), build_transformer(cfg, latent_size, channels),
                           cfg.t5_tokens)
    scheduler = build_scheduler(cfg)
    evaluator = None if test_data is None else _evaluator(vae, tokenizer, scheduler, test_data.captions,
                                                          settings.eval_guidance, settings.eval_steps)
    task = FlowTask(model, scheduler, latents, tokenize(tokenizer, train_data.captions), tokenize(tokenizer, [""])[0],
                    vae.config.scaling_factor, vae.config.shift_factor, seed=settings.seed,
                    caption_dropout=settings.caption_dropout,
                    weighting={"weighting_scheme": settings.weighting_scheme, "logit_mean": settings.logit_mean,
                               "logit_std": settings.logit_std}, evaluator=evaluator)
    loop = replace(recipe.transformer, eval_every=recipe.transformer.eval_every if test_data else 0,
                   max_minutes=max_minutes, progress=progress)
    state = train(task, loop, work / "transformer")
    if state.step < loop.steps:
        return None
    record = {"command": command, "config": asdict(cfg), "recipe": {"name": recipe.name, **recipe.record()},
              "transformer_wall_s": round(state.elapsed_s, 1), "history": {"transformer": state.history}}
    return save_teacher(make_pipeline(vae, model, tokenizer, scheduler), out, cfg, record)  # the EMA weights


def is_sd3_run(teacher_dir: str | Path) -> bool:
    """Whether a teacher run dir (holding training/) trains the SD3 layout."""
    record = Path(teacher_dir) / "training" / "recipe.json"
    return record.is_file() and read_json(record).get("layout") == "sd3"


def export_checkpoint(teacher_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Export an SD3-layout teacher from its latest checkpoint (EMA weights) in SD3 layout, its record saying the
    step: for shipping a finished run (``--fp16``: the transformer and VAE in fp16), or measuring one
    mid-schedule."""
    work = Path(teacher_dir) / "training"
    check_checkpoints(teacher_dir)
    ckpt = work / "transformer" / "checkpoint"
    if not has_checkpoint(work / "transformer"):
        raise FileNotFoundError(f"{teacher_dir} has no transformer checkpoint under training/")
    spec = read_json(work / "recipe.json", keys=("config", "settings", "transformer"))
    cfg = SD3TeacherConfig(**spec["config"])
    vae, tokenizer = source_parts(cfg)
    _, latent_size, channels = latent_geometry(vae)
    model = SD3TextToImage(build_text_encoders(cfg, tokenizer), build_transformer(cfg, latent_size, channels),
                           cfg.t5_tokens)
    shadow = ema_by_name(model, load_file(ckpt / "ema.safetensors"), ckpt)
    with torch.no_grad():
        for p, v in zip((p for p in model.parameters() if p.requires_grad), shadow, strict=True):
            p.copy_(v)
    meta = read_json(ckpt / "trainer.json")
    finished = Path(teacher_dir) / "teacher.json"  # a finished run's own export records its command
    command = read_json(finished).get("training", {}).get("command") if finished.is_file() else None
    record = {"exported_from": str(teacher_dir), "command": command,
              "recipe": {"name": spec.get("name"), "settings": spec["settings"], "transformer": spec["transformer"]},
              "transformer_step": meta["step"], "transformer_steps_planned": meta["config"]["steps"],
              "transformer_wall_s": round(meta["elapsed_s"], 1), "history": {"transformer": meta["history"]}}
    pipe = make_pipeline(vae, model, tokenizer, build_scheduler(cfg))
    return save_teacher(pipe, out, cfg, record, dtype=dtype)
