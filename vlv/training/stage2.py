"""Stage 2 as a training task: teach a causal LLM to read the stage-1 caption embeddings, image-caption pairs.

The task supplies the loop (``vlv.training.loop``) with the captioner as the trainable module (psi, and the LLM and
the encoder's trainable parts at the higher levels) and the loss of ``vlv.captioner``: z = E(x) from the
stage-1 encoder, e = psi(T(z)), cross-entropy of caption + EOS after the prefix e.

A run dir is self-describing: ``stage2.json`` (decoder, the stage-1 run dir, the LM source, data, settings, the
resolved recipe), the captioner (``captioner.json``, which names its frozen sources, + safetensors of what
trained; ``Captioner.from_pretrained(run)`` loads it alone), and ``checkpoint/`` while training.
The stage-1 run is only read: at level mlp+llm+encoder the fine-tuned encoder weights go into this run's
captioner weights, so the stage-1 encoder that reconstructs images stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from vlv.captioner import Captioner, CaptionerConfig
from vlv.data import ImageCaptionFolder, to_tensor
from vlv.datasets import step_indices
from vlv.encoder import VLVEncoder
from vlv.lm import is_lm_dir
from vlv.modeling import write_json
from vlv.shipped import is_shipped, resolve_decoder, resolve_encoder
from vlv.text_encoder import load_text_encoder
from vlv.training.config import Stage2Settings, TrainConfig
from vlv.training.loop import train

STAGE2_FILE = "stage2.json"
Evaluator = Callable[[Captioner], dict[str, float]]


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

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        idx = step_indices(len(self.data), self.seed, step, rank, world_size, batch_size)
        batch = self.captioner.tokenize([self.captions[i] for i in idx])  # (B, L) each
        batch["images"] = to_tensor(self.data.images[idx])  # (B, 3, H, W) in [-1, 1]
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        pixel_values = self.captioner.encoder.normalize(batch["images"])  # (B, 3, S, S)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=pixel_values).loss

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}


def build_captioner(settings: Stage2Settings, seed: int,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> Captioner:
    """Same seed, same psi (and same random-init LM): a resumed run rebuilds the captioner it checkpointed."""
    text_encoder = load_text_encoder(resolve_decoder(settings.decoder))
    encoder = VLVEncoder.from_pretrained(settings.encoder)
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, lm=settings.lm, trainable=settings.trainable,
                             max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                             lora_rank=settings.lora_rank, text_encoder=settings.decoder, encoder=settings.encoder)
    torch.manual_seed(seed)
    captioner = Captioner(config, text_encoder, encoder, tokenizer=tokenizer)
    if settings.gradient_checkpointing:
        captioner.lm.gradient_checkpointing_enable()
    return captioner


def train_stage2(settings: Stage2Settings, cfg: TrainConfig, out: Path, progress: bool = True,
                 evaluator: Evaluator | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 recipe: dict | None = None) -> Captioner | None:
    """Train (or resume) a stage-2 run; returns the trained captioner, or None if stopped early (re-run resumes).

    ``tokenizer`` is needed only for a random-init LM source; ``recipe`` is recorded in stage2.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Shipped names stay names and dirs become absolute paths, so the run dir loads from anywhere.
    settings = replace(settings, decoder=_portable(settings.decoder, resolve_decoder),
                       encoder=_portable(settings.encoder, resolve_encoder),
                       lm=_portable(settings.lm, Path) if is_lm_dir(settings.lm) else settings.lm)
    captioner = build_captioner(settings, cfg.seed, tokenizer)
    size = captioner.encoder.config.image_size
    data = ImageCaptionFolder(Path(settings.data), size, progress=progress)
    write_json(out / STAGE2_FILE, {"settings": asdict(settings), "train": asdict(cfg), "image_size": size,
                                   **({"recipe": recipe} if recipe else {})})
    state = train(Stage2Task(captioner, data, seed=cfg.seed, evaluator=evaluator), cfg, out)
    if not state.done:
        return None
    captioner.save_pretrained(out)
    return captioner


def _portable(source: str, resolve) -> str:
    return source if is_shipped(source) else str(resolve(source).resolve())
