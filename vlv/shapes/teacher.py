"""The shapes teacher: a text-to-image latent diffusion model in Stable Diffusion's own format.

VLV distils a frozen, pretrained T2I model; at full scale that is SD 2.1-base. The shapes world's
stand-in is built from exactly the same classes (``AutoencoderKL``, ``CLIPTextModel``,
``UNet2DConditionModel``, ``DDPMScheduler``) and saved by ``StableDiffusionPipeline.save_pretrained``,
so a teacher dir and an SD 2.1 dir are interchangeable everywhere downstream.

Recipe decisions (``docs/teacher-notes.md`` has the probes behind them):
- Tokenizer: one token per object phrase ("a large red circle at the top left"), plus the separators.
  Binding attributes to a quadrant is then done by the tokenizer, not learned by a small causal CLIP
  from the diffusion loss alone, which is what kept the probes' layouts wrong.
- v-prediction on a cosine schedule (eps on cosine gave coloured noise), trailing timesteps so
  sampling starts at t = 999, caption dropout for classifier-free guidance, EMA weights exported.
- The VAE trains first, is frozen, and its latent posteriors are cached (mean and std).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from vlv.checks import check_checkpoints, read_json, require_dirs, safetensors_keys
from vlv.data.caches import posteriors_file
from vlv.data.datasets import InMemory
from vlv.data.images import to_tensor
from vlv.data.records import read_captions
from vlv.data.sampling import step_indices
from vlv.diffusion import (
    DEFAULT_GUIDANCE,
    Random,
    Sampler,
    diffusion_loss,
    load_pipeline,
    make_pipeline,
    posterior_sample,
    sample,
    sample_latents,
    tokenize,
)
from vlv.errors import InvalidInput
from vlv.modeling import atomic_save_png, load_trainable_state, write_json
from vlv.progress import quiet_library
from vlv.shapes.config import PHASES, TeacherConfig, TeacherRecipe
from vlv.shapes.metrics import sample_accuracy, vae_accuracy
from vlv.shapes.tokenizers import build_tokenizer
from vlv.shipped import resolve_decoder
from vlv.training.checkpoint import ema_by_name, has_checkpoint
from vlv.training.draws import Draws
from vlv.training.loop import Loss, train
from vlv.training.resume import check_resume


# ------------------------------------------------------------------------------------------- models
def build_vae(cfg: TeacherConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers_per_block,
        norm_num_groups=cfg.vae_norm_groups, sample_size=cfg.image_size, mid_block_add_attention=False,
    )


def build_text_encoder(cfg: TeacherConfig, tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(config)


def build_unet(cfg: TeacherConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_cross_attention))
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads, norm_num_groups=min(32, cfg.unet_channels[0]),
        use_linear_projection=True,
    )


def build_scheduler(cfg: TeacherConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False, timestep_spacing="trailing",
                         steps_offset=1)


# ------------------------------------------------------------------------------------ training tasks
class Autoencode(torch.nn.Module):
    """The VAE's training pass as one forward, so DDP sees it (and all-reduces the VAE's gradients)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: Random) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior_sample(posterior, generator)).sample, posterior.kl()  # (B, 3, H, W), (B,)


class VAETask:
    """Phase 1: AutoencoderKL on the images: L1 + MSE + a tiny KL (a near-deterministic autoencoder)."""

    name = "teacher-vae"

    def __init__(self, vae: AutoencoderKL, train: InMemory, test: InMemory | None,
                 seed: int = 0, kl_weight: float = 1e-6):
        self.vae, self.train_data, self.test_data, self.seed, self.kl_weight = vae, train, test, seed, kl_weight
        self.model = Autoencode(vae)

    def trainable(self) -> torch.nn.Module:
        return self.model

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> torch.Tensor:
        idx = step_indices(len(self.train_data), self.seed, step, rank, world_size, batch_size)
        return to_tensor(self.train_data.images[idx]).to(device)

    def loss(self, model, images: torch.Tensor, draws: Draws) -> Loss:
        """L1 + L2 reconstruction + a light KL, a mean over the batch's images."""
        recon, kl = model(images, draws)
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + self.kl_weight * kl.mean() / images[0].numel()
        return Loss(loss, len(images))

    def evaluate(self, model) -> dict[str, float]:
        if self.test_data is None:
            return {}
        return {"vae_scene_accuracy": vae_accuracy(model.vae, self.test_data)}


class TextToImage(torch.nn.Module):
    """The jointly trained pair (text encoder, UNet): one module, so one optimizer and one DDP wrap."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNet2DConditionModel):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        cond = self.text_encoder(ids).last_hidden_state  # (B, L, d_T)
        return self.unet(noisy, t, encoder_hidden_states=cond).sample  # (B, C, h, w)


class UNetTask:
    """Phase 2: text encoder + UNet on cached latents with the scheduler's own target and caption dropout."""

    name = "teacher-unet"

    def __init__(self, model: TextToImage, scheduler: DDPMScheduler, latents: dict[str, torch.Tensor],
                 ids: torch.Tensor, empty_ids: torch.Tensor, scaling_factor: float, seed: int = 0,
                 caption_dropout: float = 0.1, high_noise_fraction: float = 0.0,
                 evaluator=None):
        self.model, self.scheduler, self.latents, self.ids = model, scheduler, latents, ids
        self.empty_ids, self.scaling_factor, self.seed = empty_ids, scaling_factor, seed
        self.caption_dropout, self.high_noise_fraction = caption_dropout, high_noise_fraction
        self.evaluator = evaluator

    def trainable(self) -> torch.nn.Module:
        return self.model

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        # Caption dropout per sample of the global batch, so any number of processes drops the same captions.
        rng = np.random.default_rng([self.seed, step, 0])
        idx = torch.from_numpy(step_indices(len(self.ids), self.seed, step, rank, world_size, batch_size))
        ids = self.ids[idx].clone()
        mine = rng.random(world_size * batch_size)[rank * batch_size : (rank + 1) * batch_size]
        drop = torch.from_numpy(mine < self.caption_dropout)
        ids[drop] = self.empty_ids
        return {"mean": self.latents["mean"][idx].float().to(device),
                "std": self.latents["std"][idx].float().to(device), "ids": ids.to(device)}

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> Loss:
        """The diffusion loss, a mean over the batch's samples."""
        latents = sample_latents(batch["mean"], batch["std"], self.scaling_factor, draws)  # (B, C, h, w)
        return Loss(diffusion_loss(lambda noisy, t: model(noisy, t, batch["ids"]), self.scheduler, latents, draws,
                                   self.high_noise_fraction), len(latents))

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}


# -------------------------------------------------------------------------------------- save / load
def save_teacher(pipe: StableDiffusionPipeline, out: Path, cfg: TeacherConfig, record: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Stable Diffusion layout (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/).

    ``dtype`` applies to the UNet and VAE, which diffusers loads back in fp32 by default. The text
    encoder always stays fp32: transformers would load it in its stored dtype, and a half-precision
    text encoder beside fp32 UNet breaks the stock ``from_pretrained(dir)(prompt=...)`` call on CPU.
    """
    out = Path(out)
    vae, unet = pipe.vae, pipe.unet
    if dtype != torch.float32:
        vae, unet = copy.deepcopy(vae).to(dtype), copy.deepcopy(unet).to(dtype)
    with quiet_library():
        make_pipeline(vae, pipe.text_encoder.float(), pipe.tokenizer, unet, pipe.scheduler).save_pretrained(
            out, safe_serialization=True)
    write_json(out / "teacher.json", {"config": asdict(cfg), **({"training": record} if record else {})})
    return out


def train_teacher(data: Path, out: Path, cfg: TeacherConfig, recipe: TeacherRecipe, val: Path | None = None,
                  max_minutes: float | None = None, progress: bool = True, command: str | None = None,
                  on_bad_image: Literal["skip", "fail"] = "skip", resume_override: bool = False) -> Path | None:
    """Train VAE, cache latents, train text encoder + UNet; export SD layout into ``out``.

    Resumable: state lives in out/training/ (checkpoints, latent cache, logs). Returns ``out`` when
    finished, None when the time budget ran out first (re-run to continue). Unreadable images are skipped and
    counted (``on_bad_image="fail"``: the first raises, naming it). A started run resumes only with the config
    and recipe it was started with, unless ``resume_override``.
    """
    out, work = Path(out), Path(out) / "training"
    require_dirs(data, val)
    for folder in (data, val):  # the text-to-image teacher learns from captions: a folder without fails now
        if folder is not None:
            read_captions(folder)
    check_checkpoints(out)
    check_resume(work, "recipe.json", {"config": asdict(cfg), **recipe.record()}, resume_override,
                 checkpoint_dir=work / "vae", upgrade=upgraded)
    skip = on_bad_image == "skip"
    train_data = InMemory.of(data, cfg.image_size, progress=progress, skip_bad=skip)
    train_data.captions  # noqa: B018 -- a folder without captions fails now, not after the VAE phase
    test_data = InMemory.of(val, cfg.image_size, limit=recipe.settings.eval_n, skip_bad=skip) if val else None
    for folder in (train_data, test_data):
        if folder is not None and folder.bad:
            print(f"[teacher] {len(folder.bad)} unreadable image(s) skipped (first {folder.bad[0]})")
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "recipe.json", {"config": asdict(cfg), "name": recipe.name, **recipe.record()})
    settings = recipe.settings
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()

    # Phase 1: the VAE.
    vae = build_vae(cfg)
    vae_cfg = replace(recipe.vae, eval_every=recipe.vae.eval_every if test_data else 0, max_minutes=max_minutes,
                      progress=progress)
    vae_state = train(VAETask(vae, train_data, test_data, seed=settings.seed), vae_cfg, work / "vae")
    if vae_state.step < vae_cfg.steps:
        return None
    vae.requires_grad_(False).eval()

    # Latent cache and scaling factor (1 / std of the latents, as SD chose 0.18215).
    latents = posteriors_file(vae, train_data, work / "latents.safetensors", batch_size=256)
    scaling = float(1.0 / latents["mean"].float().std())
    vae.register_to_config(scaling_factor=scaling)

    # Phase 2: text encoder + UNet.
    tokenizer = build_tokenizer(cfg.max_length)
    model = TextToImage(build_text_encoder(cfg, tokenizer), build_unet(cfg))
    scheduler = build_scheduler(cfg)
    ids = tokenize(tokenizer, train_data.captions)
    empty = tokenize(tokenizer, [""])[0]
    evaluator = None
    if test_data is not None:
        def evaluator(m: TextToImage) -> dict[str, float]:
            pipe = make_pipeline(vae, m.text_encoder, tokenizer, m.unet, scheduler)
            return {f"scene_accuracy_cfg{g:g}": sample_accuracy(pipe, test_data.captions, guidance_scale=g)
                    .scene_accuracy for g in settings.eval_guidance}
    task = UNetTask(model, scheduler, latents, ids, empty, scaling, seed=settings.seed,
                    caption_dropout=settings.caption_dropout, high_noise_fraction=settings.high_noise_fraction,
                    evaluator=evaluator)
    remaining = None if max_minutes is None else max(0.1, max_minutes - (time.perf_counter() - t0) / 60)
    unet_cfg = replace(recipe.unet, eval_every=recipe.unet.eval_every if test_data else 0, max_minutes=remaining,
                       progress=progress)
    unet_state = train(task, unet_cfg, work / "unet")
    if unet_state.step < unet_cfg.steps:
        return None
    # train() leaves the EMA weights in the model: export those.
    pipe = make_pipeline(vae, model.text_encoder, tokenizer, model.unet, scheduler)
    record = {"command": command, "config": asdict(cfg), "recipe": {"name": recipe.name, **recipe.record()},
              "vae_wall_s": round(vae_state.elapsed_s, 1), "unet_wall_s": round(unet_state.elapsed_s, 1),
              "history": {"vae": vae_state.history, "unet": unet_state.history}}
    return save_teacher(pipe, out, cfg, record)


# A run's recipe.json from before the teacher recipe had a section per phase: flat field -> (section, field).
_FLAT = {"vae_steps": ("vae", "steps"), "vae_batch": ("vae", "batch_size"), "vae_lr": ("vae", "lr"),
         "vae_warmup": ("vae", "warmup_steps"), "vae_min_lr_ratio": ("vae", "min_lr_ratio"),
         "vae_eval_every": ("vae", "eval_every"), "unet_steps": ("unet", "steps"), "unet_batch": ("unet", "batch_size"),
         "unet_lr": ("unet", "lr"), "unet_warmup": ("unet", "warmup_steps"),
         "unet_min_lr_ratio": ("unet", "min_lr_ratio"), "ema_decay": ("unet", "ema_decay"),
         "eval_every": ("unet", "eval_every")}


def upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe.json in the current layout (config, settings, vae, unet): an older run's flat recipe is
    mapped onto the sections, so resuming it still compares every field and exporting it still works."""
    if "recipe" not in record or "vae" in record:
        return record
    out: dict[str, Any] = {"config": record["config"], "settings": {}, "vae": {}, "unet": {}}
    for key, value in record["recipe"].items():
        if key == "checkpoint_every":
            out["vae"][key] = out["unet"][key] = value
        elif key in _FLAT:
            out[_FLAT[key][0]][_FLAT[key][1]] = value
        elif key != "extra":
            out["settings"][key] = value
    return out


def export_checkpoint(teacher_dir: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Export a teacher still in training (its latest UNet checkpoint, EMA weights) in SD layout.

    For shipping or benchmarking a teacher mid-schedule; the record says which step it is.
    """
    work = Path(teacher_dir) / "training"
    check_checkpoints(teacher_dir)
    if not has_checkpoint(work / "vae") or not has_checkpoint(work / "unet"):
        raise FileNotFoundError(f"{teacher_dir} has no VAE and UNet checkpoints under training/")
    safetensors_keys(work / "latents.safetensors")
    spec = upgraded(read_json(work / "recipe.json", keys=("config",)))
    cfg = TeacherConfig(**spec["config"])
    vae = build_vae(cfg)
    load_trainable_state(Autoencode(vae), load_file(work / "vae" / "checkpoint" / "model.safetensors"))  # its keys
    latents = load_file(work / "latents.safetensors")
    vae.register_to_config(scaling_factor=float(1.0 / latents["mean"].float().std()))
    tokenizer = build_tokenizer(cfg.max_length)
    model = TextToImage(build_text_encoder(cfg, tokenizer), build_unet(cfg))
    ckpt = work / "unet" / "checkpoint"
    shadow = ema_by_name(model, load_file(ckpt / "ema.safetensors"), ckpt)
    with torch.no_grad():
        for p, v in zip((p for p in model.parameters() if p.requires_grad), shadow, strict=True):
            p.copy_(v)
    meta = {k: read_json(work / k / "checkpoint" / "trainer.json") for k in ("vae", "unet")}
    recipe = {"name": spec.get("name"), **{k: spec[k] for k in ("settings", *PHASES)}}
    record = {"exported_from": str(teacher_dir), "recipe": recipe, "unet_step": meta["unet"]["step"],
              "unet_steps_planned": meta["unet"]["config"]["steps"], "vae_step": meta["vae"]["step"],
              "vae_wall_s": round(meta["vae"]["elapsed_s"], 1), "unet_wall_s": round(meta["unet"]["elapsed_s"], 1),
              "history": {k: m["history"] for k, m in meta.items()}}
    pipe = make_pipeline(vae, model.text_encoder, tokenizer, model.unet, build_scheduler(cfg))
    return save_teacher(pipe, out, cfg, record, dtype=dtype)


def sample_files(teacher: str | Path, prompts: list[str], out: Path, guidance_scale: float = DEFAULT_GUIDANCE,
                 steps: int | None = None, sampler: Sampler = "fast", seed: int = 0) -> int:
    """Draw one image per caption into ``out``: a PNG file for one caption (``out`` with a suffix), else a folder
    of ``000000.png``, ...; returns the count. ``steps`` None: the sampler's own count (fast 20, paper 50).

    An SD3-layout teacher draws with its own FlowMatchEuler scheduler (``steps`` None: 28); ``sampler`` names the
    SD-2 family's schedulers, so only its default applies there."""
    from vlv.shapes import teacher_sd3

    path = resolve_decoder(teacher)  # a shipped name (shapes-teacher, shapes-teacher-sd3) or a dir of either layout
    sd3 = teacher_sd3.is_sd3_dir(path)
    if sd3 and sampler != "fast":
        raise InvalidInput(f"{teacher}: an SD3-layout teacher samples with its own FlowMatchEuler scheduler; "
                           "drop --sampler (--steps sets its steps)")
    out = Path(out)
    single = len(prompts) == 1 and bool(out.suffix) and not out.is_dir()
    if not single and out.is_file():
        raise InvalidInput(f"--out {out}: a file, but {len(prompts)} captions need a folder")
    if sd3:
        images = teacher_sd3.sample(teacher_sd3.load_pipeline(path), prompts, guidance_scale=guidance_scale,
                                    steps=steps, seed=seed)
    else:
        images = sample(load_pipeline(path), prompts, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                        seed=seed)
    if single:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_png(images[0], out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            atomic_save_png(im, out / f"{i:06d}.png")
    return len(images)
