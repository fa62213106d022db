"""Stage 2 as a training task: teach a causal LLM to read the stage-1 caption embeddings, image-caption pairs.

The task supplies the loop (``vlv.train``) with the captioner as the trainable module (psi, and the LLM and
the encoder's trainable parts at the higher levels) and the loss of ``vlv.captioner``: z = E(x) from the
stage-1 encoder, e = psi(T(z)), cross-entropy of caption + EOS after the prefix e.

A run dir is self-describing: ``stage2.json`` (decoder, the stage-1 run dir, the LM source, data, settings),
the captioner (``captioner.json`` + safetensors of what trained), and ``checkpoint/`` while training.
The stage-1 run is only read: at level mlp+llm+encoder the fine-tuned encoder weights go into this run's
captioner weights, so the stage-1 encoder that reconstructs images stays as it was.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTextModel

from vlv.captioner import Captioner, CaptionerConfig, check_lora
from vlv.data import ImageCaptionFolder, atomic_write_text, to_tensor
from vlv.encoder import VLVEncoder
from vlv.lm import is_lm_dir
from vlv.presets import is_shipped, resolve_decoder, resolve_encoder, resolve_stage2
from vlv.train import TrainConfig, train
from vlv.world import shapes

STAGE2_FILE = "stage2.json"


def load_text_encoder(decoder: str | Path) -> CLIPTextModel:
    """T alone from a shipped decoder name or a Stable-Diffusion-layout dir, fp32, frozen: stage 2 needs no UNet/VAE."""
    path = resolve_decoder(decoder) / "text_encoder"
    te = CLIPTextModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return te.requires_grad_(False).eval()


class Stage2Task:
    """Trainable: the captioner at its level. Loss: caption + EOS cross-entropy after the prefix psi(T(E(x)))."""

    name = "stage2"

    def __init__(self, captioner: Captioner, data: ImageCaptionFolder, seed: int = 0, evaluator=None):
        if captioner.encoder is None:
            raise ValueError("stage 2 trains from images: the captioner needs the stage-1 encoder")
        self.captioner, self.data, self.captions = captioner, data, data.captions
        self.seed, self.evaluator = seed, evaluator

    def trainable(self) -> torch.nn.Module:
        return self.captioner

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        idx = np.random.default_rng([self.seed, step, rank]).integers(len(self.data), size=batch_size)
        batch = self.captioner.tokenize([self.captions[i] for i in idx])  # (B, L) each
        batch["images"] = to_tensor(self.data.images[idx])  # (B, 3, H, W) in [-1, 1]
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        pixel_values = self.captioner.encoder.normalize(batch["images"])  # (B, 3, S, S)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=pixel_values).loss

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}


@torch.no_grad()
def caption_images(captioner: Captioner, images: torch.Tensor, batch_size: int = 64,
                   num_beams: int | None = None) -> list[str]:
    """Images (N, 3, H, W) in [-1, 1] -> N captions, batched through the encoder and ``generate``."""
    device = captioner.psi[0].weight.device
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        pixel_values = captioner.encoder.normalize(images[start : start + batch_size].to(device))  # (B, 3, S, S)
        out += captioner.generate(pixel_values=pixel_values, num_beams=num_beams)
    return out


def caption_scores(captioner: Captioner, data: ImageCaptionFolder, num_beams: int | None = None) -> dict[str, float]:
    """Shapes data: exact captions, grammar, and the caption reader's scene accuracy / object F1 vs the truth."""
    preds = caption_images(captioner, to_tensor(data.images), num_beams=num_beams)
    truths = data.captions
    s = shapes.score([shapes.parse_caption(p) for p in preds], [shapes.parse_caption(t) for t in truths])
    return {"caption_exact": float(np.mean([p == t for p, t in zip(preds, truths, strict=True)])),
            "well_formed": float(np.mean([shapes.is_well_formed(p) for p in preds])),
            "scene_accuracy": s.scene_accuracy, "object_f1": s.object_f1}


@dataclass
class Stage2Settings:
    """What a stage-2 run was made from; saved as stage2.json so the run dir describes itself."""

    decoder: str  # shipped name or Stable-Diffusion dir: only its text encoder T is loaded
    encoder: str  # stage-1 run dir (read, never written)
    lm: str  # causal LM dir (e.g. vlv.lm.train_lm's output) or an LM preset (random init)
    data: str  # image-caption folder
    trainable: str = "mlp+llm+encoder"  # mlp | mlp+llm | mlp+llm+encoder
    lora_rank: int = 0  # > 0: the llm levels train LoRA adapters of this rank instead of the whole LLM
    max_new_tokens: int = 300
    num_beams: int = 4  # the captioner's default for generate
    gradient_checkpointing: bool = False  # recompute the LLM's activations
    val: str | None = None
    eval_n: int = 200
    eval_num_beams: int = 1  # greedy during training evaluations: cheaper

    def __post_init__(self) -> None:
        check_lora(self.trainable, self.lora_rank)  # before anything loads: a bad flag fails at once


def build_captioner(settings: Stage2Settings, seed: int) -> Captioner:
    """Same seed, same psi (and same random-init LM): a resumed run rebuilds the captioner it checkpointed."""
    text_encoder = load_text_encoder(settings.decoder)
    encoder = VLVEncoder.from_pretrained(resolve_encoder(settings.encoder))
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, lm=settings.lm, trainable=settings.trainable,
                             max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                             lora_rank=settings.lora_rank)
    torch.manual_seed(seed)
    captioner = Captioner(config, text_encoder, encoder)
    if settings.gradient_checkpointing:
        captioner.lm.gradient_checkpointing_enable()
    return captioner


def train_stage2(settings: Stage2Settings, cfg: TrainConfig, out: Path, progress: bool = True) -> Captioner | None:
    """Train (or resume) a stage-2 run; returns the trained captioner, or None if stopped early (re-run resumes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Shipped names stay names and dirs become absolute paths, so the run dir loads from anywhere.
    settings = replace(settings, encoder=_portable(settings.encoder, resolve_encoder),
                       lm=_portable(settings.lm, Path) if is_lm_dir(settings.lm) else settings.lm)
    captioner = build_captioner(settings, cfg.seed)
    size = captioner.encoder.config.image_size
    data = ImageCaptionFolder(Path(settings.data), size, progress=progress)
    meta = {"settings": asdict(settings), "train": asdict(cfg), "image_size": size}
    atomic_write_text(out / STAGE2_FILE, json.dumps(meta, indent=2) + "\n")

    evaluator = None
    if settings.val:
        val = ImageCaptionFolder(Path(settings.val), size, limit=settings.eval_n)

        def evaluator(model: Captioner) -> dict[str, float]:
            return caption_scores(model, val, num_beams=settings.eval_num_beams)

    state = train(Stage2Task(captioner, data, seed=cfg.seed, evaluator=evaluator), cfg, out)
    if not state.done:
        return None
    captioner.save_pretrained(out)
    return captioner


def _portable(source: str, resolve) -> str:
    return source if is_shipped(source) else str(resolve(source).resolve())


def load_stage2(run: str | Path) -> Captioner:
    """A finished stage-2 run dir (or the shipped ``shapes-stage2``) -> its captioner, with T from the decoder
    and the encoder from the stage-1 run."""
    run = resolve_stage2(run)
    settings = Stage2Settings(**json.loads((run / STAGE2_FILE).read_text())["settings"])
    encoder = VLVEncoder.from_pretrained(resolve_encoder(settings.encoder))
    return Captioner.from_pretrained(run, load_text_encoder(settings.decoder), encoder)
