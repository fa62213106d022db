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
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from vlv.captioner import Captioner, CaptionerConfig
from vlv.data.datasets import Dataset, FolderDataset, InMemory, open_dataset
from vlv.data.images import to_tensor
from vlv.encoder import VLVEncoder
from vlv.lm import is_lm_dir
from vlv.modeling import write_json
from vlv.shipped import is_shipped, resolve_decoder, resolve_encoder
from vlv.text_encoder import load_text_encoder
from vlv.training.config import Stage2Settings, TrainConfig
from vlv.training.data import StepImages
from vlv.training.loop import Draws, across_ranks, check_request, global_batch, make_accelerator, train
from vlv.training.sharding import shard

STAGE2_FILE = "stage2.json"
Evaluator = Callable[[Captioner], dict[str, float]]


class Stage2Task:
    """Trainable: the captioner at its level. Loss: caption + EOS cross-entropy after the prefix psi(T(E(x))).

    ``data`` is a :mod:`vlv.data.datasets` dataset (decoded by ``num_workers`` workers; an :class:`InMemory` one
    is decoded already); every sample needs a caption.
    """

    name = "stage2"

    def __init__(self, captioner: Captioner, data: Dataset, seed: int = 0, evaluator=None,
                 num_workers: int = 0, on_bad_image: Literal["skip", "fail"] = "skip"):
        if captioner.encoder is None:
            raise ValueError("stage 2 trains from images: the captioner needs the stage-1 encoder")
        if isinstance(data, InMemory):
            data.captions  # noqa: B018 -- raises at once on a folder with images but no captions
        elif isinstance(data, FolderDataset) and any(r.caption is None for r in data.records):
            raise ValueError(f"{data.folder} has images without captions")
        self.captioner, self.seed, self.evaluator = captioner, seed, evaluator
        self.images = StepImages(data, captioner.encoder.config.image_size, seed, num_workers, on_bad_image)

    def trainable(self) -> torch.nn.Module:
        return self.captioner

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        got = self.images.get(step, rank, world_size, batch_size)
        if not len(got["indices"]):
            raise ValueError(f"step {step}: every sample of the batch was bad")
        missing = [i for i, c in zip(got["indices"].tolist(), got["captions"], strict=True) if c is None]
        if missing:
            raise ValueError(f"sample {self.images.where(missing[0])} has no caption: stage 2 needs captions")
        batch = self.captioner.tokenize(got["captions"])  # (B, L) each
        batch["images"] = to_tensor(got["images"].numpy())  # (B, 3, H, W) in [-1, 1]
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> torch.Tensor:
        """Cross-entropy per caption token of the global batch (every token weighs the same on any world size)."""
        pixel_values = self.captioner.encoder.normalize(batch["images"])  # (B, 3, S, S)
        items = None if draws.world_size == 1 else across_ranks(batch["attention_mask"].sum())
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=pixel_values, num_items_in_batch=items).loss
        return loss * draws.world_size

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluator(model) if self.evaluator is not None else {}

    def shard(self, mesh, policy, reshard_after_forward: bool) -> None:
        """FSDP2 over the LLM's blocks and the captioner (frozen T and a frozen encoder stay replicated), generation
        included."""
        shard(self.captioner, mesh, policy, reshard_after_forward, methods=("generate_ids",))

    def close(self) -> None:
        self.images.close()


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
    # Shipped names stay names and dirs become absolute paths, so the run dir loads from anywhere.
    settings = replace(settings, decoder=_portable(settings.decoder, resolve_decoder),
                       encoder=_portable(settings.encoder, resolve_encoder),
                       lm=_portable(settings.lm, Path) if is_lm_dir(settings.lm) else settings.lm)
    check_request(out, STAGE2_FILE, {"settings": asdict(settings), "train": asdict(cfg)}, cfg)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    captioner = build_captioner(settings, cfg.seed, tokenizer)
    size = captioner.encoder.config.image_size
    dataset = open_dataset(settings.data, settings.image_column, settings.caption_column)
    write_json(out / STAGE2_FILE, {"settings": asdict(settings), "train": asdict(cfg), "image_size": size,
                                   "samples": len(dataset), "global_batch": global_batch(cfg, accelerator),
                                   **({"recipe": recipe} if recipe else {})})
    task = Stage2Task(captioner, dataset, seed=cfg.seed, evaluator=evaluator, num_workers=settings.num_workers,
                      on_bad_image=settings.on_bad_image)
    try:
        state = train(task, cfg, out, accelerator)
    finally:
        task.close()
    task.images.bad.save(out, accelerator, task.name)
    if not state.done:
        return None
    captioner.save_pretrained(out)
    return captioner


def _portable(source: str, resolve) -> str:
    return source if is_shipped(source) else str(resolve(source).resolve())
