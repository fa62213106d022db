"""Stage 2 as a training task: teach a causal LLM to read the stage-1 caption embeddings, image-caption pairs.

The task supplies the loop (``vlv.training.loop``) with the captioner as the trainable module (psi, and the LLM and
the encoder's trainable parts at the higher levels) and the loss of ``vlv.captioner``: z = E(x) from the
stage-1 encoder, e = psi(T(z)), cross-entropy of caption + EOS after the prefix e. At the levels that freeze the
encoder (mlp, mlp+llm) c = T(E(x)) is cached once per image (``text_embeds/``, :mod:`vlv.data.caches`), so a step
reads its rows and captions and never decodes an image.

A run dir is self-describing: ``stage2.json`` (decoder, the stage-1 run dir, the LM source, data, settings, the
resolved recipe), the captioner (``captioner.json``, which names its frozen sources, + safetensors of what
trained; ``Captioner.from_pretrained(run)`` loads it alone), ``checkpoint/`` while training, and ``text_embeds/``
when c was cached in the run (``--text-embeds-cache`` names another run's instead).
The stage-1 run is only read: at level mlp+llm+encoder the fine-tuned encoder weights go into this run's
captioner weights, so the stage-1 encoder that reconstructs images stays as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from vlv.captioner import Captioner, CaptionerConfig
from vlv.checks import check_checkpoints, check_text_width, read_json, require_data, require_dirs, same_text_encoder
from vlv.config import CACHE_BATCH_SIZE, CACHE_SHARD_ROWS
from vlv.data.caches import Cache
from vlv.data.datasets import Dataset, FolderDataset, InMemory, open_dataset, require_readable
from vlv.data.outputs import process_state
from vlv.data.sampling import step_indices
from vlv.encoder import CONFIG_FILE as ENCODER_FILE
from vlv.encoder import VLVEncoder
from vlv.errors import InvalidInput
from vlv.lm import check_lm_source, is_lm_dir
from vlv.modeling import write_json
from vlv.shipped import is_shipped, resolve_decoder, resolve_encoder
from vlv.text_encoder import load_text_encoder
from vlv.training.caches import build_cache, run_text_embeds_cache
from vlv.training.config import Stage2Settings, TrainConfig
from vlv.training.data import StepImages, drop_bad_rows, open_val
from vlv.training.draws import Draws
from vlv.training.loop import Loss, global_batch, make_accelerator, train, write_once
from vlv.training.resume import check_request
from vlv.training.sharding import shard
from vlv.training.stage1 import SAMPLES, Precomputed, recorded_decoder, stage1_record
from vlv.training.tracking import ImageGrid, Texts

STAGE2_FILE = "stage2.json"
Evaluator = Callable[[Captioner], dict[str, float | ImageGrid | Texts]]


class Stage2Task:
    """Trainable: the captioner at its level. Loss: caption + EOS cross-entropy after the prefix psi(T(E(x))).

    ``data`` is a :mod:`vlv.data.datasets` dataset (decoded by ``num_workers`` workers; an :class:`InMemory` one
    is decoded already); every sample needs a caption. ``text_embeds`` (a frozen encoder only) is a cache of
    c = T(E(x)) over ``data``: a step then reads its rows and captions, never the images.
    """

    name = "stage2"
    unit = "tokens"  # what a loss's count counts: the trackers' throughput

    def __init__(self, captioner: Captioner, data: Dataset, seed: int = 0, evaluator=None,
                 num_workers: int = 0, on_bad_image: Literal["skip", "fail"] = "skip",
                 text_embeds: Cache | None = None, image_size: int | None = None, record: Path | None = None):
        if captioner.encoder is None:
            raise ValueError("stage 2 trains from images: the captioner needs the stage-1 encoder")
        if text_embeds is not None and captioner.encoder_trains:
            raise ValueError("the encoder trains at this level, so T(E(x)) changes every step: nothing to cache")
        if text_embeds is not None and len(text_embeds) != len(data):
            raise ValueError(f"the text_embeds cache holds {len(text_embeds)} rows for {len(data)} samples")
        if isinstance(data, InMemory):
            data.captions  # noqa: B018 -- raises at once on a folder with images but no captions
        elif isinstance(data, FolderDataset) and any(r.caption is None for r in data.records):
            raise ValueError(f"{data.folder} has images without captions")
        self.captioner, self.seed, self.evaluator = captioner, seed, evaluator
        self.record = record  # the run's stage2.json, copied into exports
        self.data, self.text_embeds, self.on_bad_image = data, text_embeds, on_bad_image
        transform = captioner.encoder.transform  # the crop stage 1 trained on, unless the run reads another size
        self.images = StepImages(data, (transform.at(image_size) if image_size else transform).crop, seed,
                                 num_workers, on_bad_image)
        self.pixel_free = text_embeds is not None

    def trainable(self) -> torch.nn.Module:
        return self.captioner

    def export(self, out: Path) -> None:
        """A stage-2 run dir of the weights so far: Captioner.from_pretrained loads it as it is."""
        self.captioner.save_pretrained(out)
        if self.record is not None:
            shutil.copyfile(self.record, out / self.record.name)

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        """Captions (tokenised) and the images, or their cached c: the same samples either way."""
        if self.pixel_free:
            return self._cached_batch(step, rank, batch_size, device, world_size)
        got = self.images.get(step, rank, world_size, batch_size)
        if not len(got["indices"]):
            raise ValueError(f"step {step}: every sample of the batch was bad")
        batch = {k: v.to(device) for k, v in self._tokenized(got["indices"].tolist(), got["captions"]).items()}
        batch["pixel_values"] = self.captioner.encoder.transform.pixels(got["images"], device)  # (B, 3, S, S)
        return batch

    def _cached_batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int
                      ) -> dict[str, torch.Tensor]:
        idx = step_indices(len(self.images), self.seed, step, rank, world_size, batch_size)
        idx = idx[drop_bad_rows(idx, self.text_embeds.ok[idx], self.images, step, rank, self.on_bad_image)]
        if not len(idx):
            raise ValueError(f"step {step}: every sample of the batch was bad")
        batch = self._tokenized(idx.tolist(), [self.data.caption(int(i)) for i in idx])
        batch["text_embeds"] = self.text_embeds[idx]["text_embeds"].float()  # (B, Nq, d_T)
        return {k: v.to(device) for k, v in batch.items()}

    def _tokenized(self, indices: list[int], captions: list[str | None]) -> dict[str, torch.Tensor]:
        missing = [i for i, c in zip(indices, captions, strict=True) if c is None]
        if missing:
            raise ValueError(f"sample {self.images.where(missing[0])} has no caption: stage 2 needs captions")
        return self.captioner.tokenize(captions)  # (B, L) each

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> Loss:
        """Cross-entropy, a mean over the caption tokens (+ EOS): the loop weighs every token of the global batch
        the same on any world size."""
        return stage2_loss(model, batch)

    def evaluate(self, model) -> dict[str, float | ImageGrid | Texts]:
        return self.evaluator(model) if self.evaluator is not None else {}

    def shard(self, mesh, policy, reshard_after_forward: bool) -> None:
        """FSDP2 over the LLM's blocks and the captioner (frozen T and a frozen encoder stay replicated), generation
        included."""
        shard(self.captioner, mesh, policy, reshard_after_forward, methods=("generate_ids",))

    def close(self) -> None:
        self.images.close()


def stage2_loss(model, batch: dict[str, torch.Tensor]) -> Loss:
    """One step's loss over a batch as :meth:`Stage2Task.batch` makes it (``vlv.training.plan`` runs the same one
    on shapes alone): ``model`` is the captioner as the loop wraps it."""
    if "text_embeds" in batch:
        source = {"text_embeds": batch["text_embeds"]}
    else:
        source = {"pixel_values": batch["pixel_values"]}  # (B, 3, S, S)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **source).loss
    return Loss(loss, batch["attention_mask"].sum())


# ------------------------------------------------------------------------------------ held-out loss
@torch.no_grad()
def held_out_caption_loss(captioner: Captioner, data: InMemory, batch_size: int = 16) -> float:
    """The stage-2 loss on held-out image-caption pairs: cross-entropy of caption + EOS after the prefix, a mean
    over all their tokens, as training weighs them. Nothing is drawn: it moves only when the weights do."""
    device = next(captioner.text_encoder.parameters()).device  # T is never sharded
    captions, total, count = data.captions, 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in captioner.tokenize(captions[start:start + batch_size]).items()}
        pixel_values = captioner.encoder.transform.pixels(data.images[start:start + batch_size], device)
        loss, n = stage2_loss(captioner, {**batch, "pixel_values": pixel_values})  # (B, 3, S, S) images
        total, count = total + loss.item() * int(n), count + int(n)
    return total / count


@torch.no_grad()
def sample_captions(captioner: Captioner, data: InMemory, n: int) -> Texts:
    """The captioner's captions (its own decoding: greedy or beam search) of the first ``n`` held-out images,
    each beside the image's name and its reference caption."""
    device = next(captioner.text_encoder.parameters()).device
    made = captioner.generate(pixel_values=captioner.encoder.transform.pixels(data.images[:n], device))
    return Texts(tuple(f"{data.where(i)}: {c}  (reference: {data.read(i).caption})" for i, c in enumerate(made)))


def val_caption_evaluator(val: str | Path, n: int, image_column: str = "image", caption_column: str = "caption",
                          samples: int = SAMPLES) -> Evaluator:
    """``evaluator(captioner)`` for ``train_stage2`` on any image-caption data (folder, tars, parquet): the
    held-out caption loss on its first ``n`` samples (read once, as the stage-1 encoder crops) and the captions
    of the first ``samples``. The data is checked now, before a run loads anything: it exists, holds samples,
    and the first ``n`` have captions."""
    dataset = open_val(val, image_column, caption_column, captions=n)
    cache: dict[int, InMemory] = {}

    def evaluate(captioner: Captioner) -> dict[str, float | ImageGrid | Texts]:
        size = captioner.encoder.transform.crop_size
        if size not in cache:
            cache[size] = InMemory(dataset, size, limit=n, skip_bad=True)
        data = cache[size]
        shown = {"captions": sample_captions(captioner, data, samples)} if samples else {}
        return {"val_loss": held_out_caption_loss(captioner, data), **shown}

    return evaluate


def build_captioner(settings: Stage2Settings, seed: int,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> Captioner:
    """Same seed, same psi (and same random-init LM): a resumed run rebuilds the captioner it checkpointed."""
    text_encoder = load_text_encoder(resolve_decoder(settings.decoder))
    return assemble_captioner(settings, text_encoder, VLVEncoder.from_pretrained(settings.encoder), seed, tokenizer)


def assemble_captioner(settings: Stage2Settings, text_encoder: torch.nn.Module, encoder: VLVEncoder, seed: int,
                       tokenizer: PreTrainedTokenizerBase | None = None, lm: torch.nn.Module | None = None
                       ) -> Captioner:
    """The captioner a run with these settings trains, from its loaded parts (the LM built from ``settings.lm``
    unless given), gradient checkpointing as asked."""
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, lm=settings.lm, trainable=settings.trainable,
                             max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                             lora_rank=settings.lora_rank, text_encoder=settings.decoder, encoder=settings.encoder)
    torch.manual_seed(seed)
    captioner = Captioner(config, text_encoder, encoder, lm=lm, tokenizer=tokenizer)
    if settings.gradient_checkpointing:  # transformers recomputes only in train mode, which the loop sets
        captioner.lm.activation_checkpointing_enable()
    return captioner


def stage1_inputs(encoder: str, decoder: str | None, image_size: int | None) -> tuple[str, int | None]:
    """(decoder, data resolution) of a stage-2 run on this stage-1 run: its own decoder and resolution unless given
    (None: the encoder's size). z means something only to the text encoder T it was trained against, so another
    decoder is refused unless its T is the same (a copy); an encoder dir without a record (imported) needs it given.
    """
    record = stage1_record(encoder)
    size = image_size or (record.get("image_size") if record else None)
    if record is None:
        if decoder is None:
            raise InvalidInput(f"--encoder {encoder} records no decoder (no stage1.json: an imported or hand-saved "
                               "encoder): pass --decoder, the Stable Diffusion dir its stage 1 trained against")
        return decoder, size
    own = recorded_decoder(record)
    try:
        own_dir = resolve_decoder(own)
    except FileNotFoundError:  # moved since: nothing to compare with
        if decoder is None:
            raise InvalidInput(f"--encoder {encoder} was trained against the decoder {own}, which is not there any "
                               "more: pass --decoder with that Stable Diffusion dir") from None
        return decoder, size
    if decoder is None:
        return own, size
    if not same_text_encoder(resolve_decoder(decoder), own_dir):
        raise InvalidInput(f"--decoder {decoder}: stage-1 run {encoder} was trained against {own}, whose text "
                           f"encoder differs (z means something only to that one); drop --decoder to use it")
    return decoder, size


@dataclass
class Stage2Plan:
    """A stage-2 run whose inputs are all checked: what :func:`run_stage2` trains."""

    settings: Stage2Settings  # sources portable: shipped names as names, dirs as absolute paths
    train: TrainConfig
    out: Path
    dataset: Dataset  # opened once; every sample has a caption
    evaluator: Evaluator | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    recipe: dict | None = None


def prepare_stage2(settings: Stage2Settings, cfg: TrainConfig, out: str | Path, evaluator: Evaluator | None = None,
                   tokenizer: PreTrainedTokenizerBase | None = None, recipe: dict | None = None,
                   gpu_memory: float | None = None) -> Stage2Plan:
    """Check every input of a stage-2 run before any model loads (nothing is created).

    ``tokenizer`` is needed only for a random-init LM source; ``recipe`` is recorded in stage2.json. On a GPU (or
    given ``gpu_memory`` GiB) a run whose step does not fit is refused (:mod:`vlv.training.plan`).
    """
    out = Path(out)
    require_data(settings.data)
    check_lm_source(settings.lm)
    check_text_embeds(settings)
    resolve_encoder(settings.encoder)
    decoder, size = stage1_inputs(settings.encoder, settings.decoder, settings.image_size)
    settings = replace(settings, decoder=decoder, image_size=size)
    # Shipped names stay names and dirs become absolute paths, so the run dir loads from anywhere.
    settings = replace(settings, decoder=_portable(settings.decoder, resolve_decoder),
                       encoder=_portable(settings.encoder, resolve_encoder),
                       lm=_portable(settings.lm, Path) if is_lm_dir(settings.lm) else settings.lm)
    check_pair(settings.encoder, settings.decoder)
    dataset = open_dataset(settings.data, settings.image_column, settings.caption_column)
    if not len(dataset):
        raise InvalidInput(f"{settings.data}: no samples")
    if dataset.read(0).caption is None:
        raise InvalidInput(f"{settings.data}: no captions (sample {dataset.where(0)} has none); stage 2 needs them")
    if settings.text_embeds_cache is None:  # with a given cache, a step reads its rows, never an image
        require_readable(dataset, settings.data)
    if settings.text_embeds_cache is not None:
        require_dirs(settings.text_embeds_cache)
        Cache(settings.text_embeds_cache)  # made and finished: what it was made from is checked once the models load
        settings = replace(settings, text_embeds_cache=str(Path(settings.text_embeds_cache).resolve()))
    check_checkpoints(out)
    check_request(out, STAGE2_FILE, {"settings": asdict(settings), "train": asdict(cfg)}, cfg)
    from vlv.training.plan import check_memory, plan_stage2, world_size  # it builds on this module

    check_memory(lambda: plan_stage2(settings, cfg, world_size(), len(dataset), (recipe or {}).get("name"),
                                     tokenizer=tokenizer), gpu_memory)
    return Stage2Plan(settings, cfg, out, dataset, evaluator, tokenizer, recipe)


def check_text_embeds(settings: Stage2Settings) -> None:
    """Refuse a cache of c = T(E(x)) where the encoder trains (its c moves every step) or one both asked for and
    refused."""
    if settings.text_embeds_cache is not None and settings.cache_text_embeds is False:
        raise InvalidInput(f"--text-embeds-cache {settings.text_embeds_cache} with --no-cache-text-embeds: "
                           "pass one or the other")
    if settings.caches_text_embeds and settings.trainable == "mlp+llm+encoder":
        flag = "--text-embeds-cache" if settings.text_embeds_cache else "--cache-text-embeds"
        raise InvalidInput(f"{flag}: at level mlp+llm+encoder the encoder trains, so T(E(x)) changes every step "
                           "and cannot be cached; use level mlp or mlp+llm, or drop the flag")


def train_stage2(settings: Stage2Settings, cfg: TrainConfig, out: str | Path, progress: bool = True,
                 evaluator: Evaluator | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 recipe: dict | None = None, gpu_memory: float | None = None) -> Captioner | None:
    """Check (:func:`prepare_stage2`), then train or resume a stage-2 run; returns the trained captioner, or None
    if stopped early (a re-run resumes)."""
    return run_stage2(prepare_stage2(settings, cfg, out, evaluator, tokenizer, recipe, gpu_memory))


def run_stage2(plan: Stage2Plan) -> Captioner | None:
    """Train (or resume) a prepared stage-2 run; returns the trained captioner, or None if stopped early."""
    settings, cfg, out = plan.settings, plan.train, plan.out
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, out)
    captioner = build_captioner(settings, cfg.seed, plan.tokenizer)
    size = settings.image_size or captioner.encoder.transform.crop_size
    write_json(out / STAGE2_FILE, {"settings": asdict(settings), "train": asdict(cfg), "image_size": size,
                                   "samples": len(plan.dataset), "global_batch": global_batch(cfg, accelerator),
                                   **({"recipe": plan.recipe} if plan.recipe else {})})
    text_embeds = None
    if settings.caches_text_embeds:
        text_embeds = run_text_embeds_cache(settings, captioner.encoder, captioner.text_encoder, plan.dataset,
                                            captioner.encoder.transform.at(size).crop, out, accelerator,
                                            cfg.mixed_precision,
                                            cfg.batch_size, progress=cfg.progress)
    task = Stage2Task(captioner, plan.dataset, seed=cfg.seed, evaluator=plan.evaluator,
                      num_workers=settings.num_workers, on_bad_image=settings.on_bad_image, text_embeds=text_embeds,
                      image_size=size, record=out / STAGE2_FILE)
    try:
        state = train(task, cfg, out, accelerator)
    finally:
        task.close()
    task.images.bad.save(out, accelerator, task.name)
    if not state.done:
        return None
    write_once(captioner, lambda: captioner.save_pretrained(out))
    return captioner


def precompute_text_embeds(decoder: str | Path | None, encoder: str, data: str, out: str | Path,
                           batch_size: int = CACHE_BATCH_SIZE["text_embeds"], shard_rows: int = CACHE_SHARD_ROWS,
                           num_workers: int = 2, on_bad_image: Literal["skip", "fail"] = "skip",
                           precision: Literal["no", "bf16"] = "no", image_column: str = "image",
                           caption_column: str = "caption", progress: bool = True,
                           image_size: int | None = None, gpu_memory: float | None = None) -> Precomputed:
    """Cache c = T(E(x)) once for any number of stage-2 runs at level mlp / mlp+llm (``--text-embeds-cache``) with
    this decoder's T (None: the stage-1 run's), stage-1 ``encoder``, data at ``image_size`` (None: the stage-1
    run's, as stage 2 reads it) and ``precision`` (this process's shards). ``batch_size``: the runs' per-process
    batch, so the rows are the bits their steps would compute. Inputs are checked before a model loads.
    """
    if num_workers < 0:
        raise InvalidInput(f"--num-workers must be >= 0, got {num_workers}")
    resolve_encoder(encoder)
    decoder, image_size = stage1_inputs(encoder, None if decoder is None else str(decoder), image_size)
    decoder_dir = resolve_decoder(decoder)
    check_pair(encoder, decoder)
    require_data(data)
    dataset = open_dataset(data, image_column, caption_column)
    if not len(dataset):
        raise InvalidInput(f"{data}: no samples")
    require_readable(dataset, data)  # else a cache of empty rows
    from vlv.training.plan import check_memory, plan_precompute  # it builds on this module

    check_memory(lambda: plan_precompute("text_embeds", decoder_dir, image_size, batch_size, encoder, precision),
                 gpu_memory)
    state = process_state()
    text_encoder = load_text_encoder(decoder_dir).to(state.device)
    vlv_encoder = VLVEncoder.from_pretrained(encoder).to(state.device)
    size = image_size or vlv_encoder.transform.crop_size
    autocast = torch.autocast(state.device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    bad = build_cache("text_embeds", out, dataset, vlv_encoder.transform.at(size).crop, state, encoder=vlv_encoder,
                      text_encoder=text_encoder, batch_size=batch_size, shard_rows=shard_rows, num_workers=num_workers,
                      on_bad_image=on_bad_image, autocast=autocast, progress=progress, precision=precision)
    return Precomputed(state.process_index, state.num_processes, len(dataset), size, bad)


def check_pair(encoder: str | Path, decoder: str | Path) -> None:
    """The stage-1 encoder's z fits the decoder's T (widths from the configs; nothing loads)."""
    z_width = read_json(resolve_encoder(encoder) / ENCODER_FILE, keys=("config",))["config"]["text_dim"]
    check_text_width(z_width, resolve_decoder(decoder), encoder, decoder)


def _portable(source: str, resolve) -> str:
    return source if is_shipped(source) else str(resolve(source).resolve())
