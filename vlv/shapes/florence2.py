"""The pretrained shapes Florence-2 (``shapes-florence2``): Florence-2 pre-trained on object detection of shapes.

Why: the paper starts stage 1 from a *pretrained* Florence-2 and keeps its DaViT frozen. No pretrained Florence-2
sees the shapes world, so vlv makes one the way Florence-2 was made: a vision task of its own family that is not
captioning. Its ``<OD>`` task writes each object as ``label<loc_x1><loc_y1><loc_x2><loc_y2>``, the box corners
quantised to location tokens; here the label is ``color shape``, and a 64-px image has 64 bins (one per pixel)
where Florence-2-large's 768 px have 1,000. Training is ``Florence2ForConditionalGeneration``'s ordinary seq2seq
loss; the prompt is the empty one (``<s></s>``: it has one task), the same prompt stage 1 then feeds it.

The result is a native Florence-2 checkpoint dir (``save_pretrained``: config.json, model.safetensors, the
tokenizer) with ``florence2.json`` recording how it was trained, so ``VLVEncoder`` reads it as it reads
Florence-2-large.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import Florence2Config, Florence2ForConditionalGeneration, PreTrainedTokenizerFast

from vlv.checks import check_checkpoints, require_dirs
from vlv.config import read_config
from vlv.data.records import CAPTIONS, read_records
from vlv.data.sampling import step_indices
from vlv.data.transforms import pixel_values
from vlv.errors import InvalidInput
from vlv.modeling import write_json
from vlv.progress import quiet_library
from vlv.shapes import world
from vlv.shapes.config import DetectionSettings
from vlv.training.config import TrainConfig
from vlv.training.draws import Draws
from vlv.training.loop import Loss, train, write_once
from vlv.training.tracking import check_report_to

RECORD_FILE = "florence2.json"
LOC_BINS = world.SIZE  # one location token per pixel of the 64-px canvas
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]  # BART's ids 0..3, as the florence2-shapes config has
IGNORE = -100
_LOC = re.compile(r"<loc_(\d+)>")
_OBJECT = re.compile(r"(\w+) (\w+)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")


# ------------------------------------------------------------------------------------- tokens
def build_detection_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the specials, the labels' words and ``<loc_0>`` .. ``<loc_63>``; decoding joins tokens with
    spaces, which :func:`parse_detections` ignores before location tokens."""
    words = [*world.COLORS, *world.SHAPES]
    vocab = {t: i for i, t in enumerate([*SPECIAL, *words, *(f"<loc_{i}>" for i in range(LOC_BINS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<loc_\d+>"), behavior="isolated"),
        pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def quantize(x: float) -> int:
    """A pixel coordinate -> its location bin, as Florence-2's processor quantises (floor, clipped)."""
    return int(min(max(np.floor(x * LOC_BINS / world.SIZE), 0), LOC_BINS - 1))


def box(o: world.ShapeObject) -> tuple[int, int, int, int]:
    """The object's box (x1, y1, x2, y2) in pixels: every shape of radius r fills [c - r, c + r]."""
    qx, qy = world.POSITIONS[o.position]
    r = world.SIZES[o.size]
    cx, cy = qx + o.dx, qy + o.dy
    return cx - r, cy - r, cx + r, cy + r


def detection_text(scene: world.Scene) -> str:
    """The ``<OD>`` target: ``color shape<loc_x1><loc_y1><loc_x2><loc_y2>`` per object, in reading order."""
    return "".join(f"{o.color} {o.shape}" + "".join(f"<loc_{quantize(v)}>" for v in box(o)) for o in scene.objects)


def parse_detections(text: str) -> set[world.Fact]:
    """OD text -> the scene facts it states: the quadrant from the box centre, the size from its width."""
    facts = set()
    for color, shape, *corners in _OBJECT.findall(text.replace(" <loc", "<loc")):
        x1, y1, x2, y2 = (int(c) for c in corners)
        if color not in world.COLORS or shape not in world.SHAPES:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        position = f"{'top' if cy < world.SIZE / 2 else 'bottom'} {'left' if cx < world.SIZE / 2 else 'right'}"
        small, large = world.SIZES["small"], world.SIZES["large"]
        size = "small" if (x2 - x1) < small + large else "large"
        facts.add((position, shape, color, size))
    return facts


# ------------------------------------------------------------------------------------- model
def build_florence2(tokenizer: PreTrainedTokenizerFast, architecture: str = "florence2-shapes"
                    ) -> Florence2ForConditionalGeneration:
    """Random init of a shipped Florence-2 architecture, its vocabulary sized to the detection tokenizer."""
    config = read_config(architecture)
    config["text_config"] = {**config["text_config"], "vocab_size": len(tokenizer)}
    config["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    return Florence2ForConditionalGeneration(Florence2Config.from_dict(config))


def num_image_tokens(model: Florence2ForConditionalGeneration, image_size: int) -> int:
    with torch.no_grad():
        return model.model.get_image_features(torch.zeros(1, 3, image_size, image_size)).pooler_output.shape[1]


def read_scenes(folder: Path) -> list[world.Scene]:
    """The scenes of a shapes folder (``vlv data shapes``): detection needs the boxes, which captions lack."""
    path = Path(folder) / CAPTIONS
    if not path.is_file():
        raise FileNotFoundError(f"no {CAPTIONS} in {folder}: make shapes data with `vlv data shapes`")
    records = read_records(Path(folder))
    if any(r.scene is None for r in records):
        raise InvalidInput(f"{path}: every row needs a 'scene' (shapes data from `vlv data shapes`)")
    scenes = []
    for i, r in enumerate(records, 1):
        try:
            scenes.append(world.Scene.from_json(r.scene))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"{path}: row {i} ({r.image}): not a shapes scene ({e})") from None
    return scenes


class DetectionTask:
    """Trainable: the whole Florence-2. Loss: next-token cross-entropy of the OD text (the model's own loss)."""

    name = "florence2"
    unit = "tokens"  # what a loss's count counts: the trackers' throughput

    def __init__(self, model: Florence2ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
                 scenes: list[world.Scene], val: list[world.Scene] | None = None, image_size: int = world.SIZE,
                 seed: int = 0):
        self.model, self.tokenizer, self.scenes, self.val = model, tokenizer, scenes, val
        self.image_size, self.seed = image_size, seed
        nv = num_image_tokens(model, image_size)
        image, bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<s>", "</s>"))
        self.prompt = torch.tensor([image] * nv + [bos, eos])  # Florence's input: image tokens, then <s>prompt</s>

    def trainable(self) -> torch.nn.Module:
        return self.model

    def inputs(self, scenes: Sequence[world.Scene], device: torch.device) -> dict[str, torch.Tensor]:
        images = pixel_values([world.render(s) for s in scenes], self.image_size)  # (B, 3, S, S)
        return {"pixel_values": images.to(device),
                "input_ids": self.prompt[None].expand(len(scenes), -1).to(device)}  # (B, Nv + 2)

    def batch(self, step: int, rank: int, batch_size: int, device: torch.device, world_size: int = 1
              ) -> dict[str, torch.Tensor]:
        idx = step_indices(len(self.scenes), self.seed, step, rank, world_size, batch_size)
        scenes = [self.scenes[i] for i in idx]
        tok = self.tokenizer
        texts = [tok.bos_token + detection_text(s) + tok.eos_token for s in scenes]  # as Florence's labels
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, IGNORE)  # (B, L)
        return {**self.inputs(scenes, device), "labels": labels.to(device)}

    def loss(self, model, batch: dict[str, torch.Tensor], draws: Draws) -> Loss:
        """Cross-entropy, a mean over the label tokens: the loop weighs every token of the global batch the same."""
        return Loss(model(**batch).loss, (batch["labels"] != IGNORE).sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Held-out scene accuracy of the greedy OD output, read back into facts."""
        if not self.val:
            return {}
        return detection_scores(model, self, self.val)


@torch.no_grad()
def detect(model: Florence2ForConditionalGeneration, task: DetectionTask, scenes: Sequence[world.Scene],
           batch_size: int = 128) -> list[str]:
    """Greedy OD text per scene (Florence-2's own ``generate``)."""
    device, texts = next(model.parameters()).device, []
    for i in range(0, len(scenes), batch_size):
        out = model.generate(**task.inputs(scenes[i : i + batch_size], device), max_new_tokens=3 * 6 + 2,
                             do_sample=False, num_beams=1)
        texts += task.tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts


def detection_scores(model, task: DetectionTask, scenes: Sequence[world.Scene]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    preds = [parse_detections(t) for t in detect(model, task, scenes)]
    model.train(was_training)
    s = world.score(preds, [s.facts for s in scenes])
    return {"scene_accuracy": s.scene_accuracy, "object_f1": s.object_f1}


def train_florence2(settings: DetectionSettings, cfg: TrainConfig, out: Path, recipe: dict | None = None
                    ) -> Florence2ForConditionalGeneration | None:
    """Pre-train (or resume) the shapes Florence-2 on detection; None if stopped early (a re-run resumes).

    ``out`` ends a native Florence-2 dir that ``vlv train stage1 --encoder DIR`` (or a named encoder that points
    at it) reads as it reads Florence-2-large.
    """
    out = Path(out)
    require_dirs(settings.data, settings.val)
    check_report_to(cfg.report_to)
    check_checkpoints(out)
    scenes = read_scenes(Path(settings.data))
    val = read_scenes(Path(settings.val))[: settings.eval_n] if settings.val else None
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # same random init on resume
    tokenizer = build_detection_tokenizer()
    model = build_florence2(tokenizer, settings.architecture)
    task = DetectionTask(model, tokenizer, scenes, val, seed=cfg.seed)
    state = train(task, cfg, out)
    if not state.done:
        return None
    model.eval()
    record = {"task": "<OD> object detection (labels 'color shape', 64 location bins)",
              "settings": asdict(settings), "train": asdict(cfg), "scenes": len(scenes),
              "wall_s": round(state.elapsed_s, 1), "evals": [h["eval"] for h in state.history if "eval" in h],
              **({"recipe": recipe} if recipe else {})}
    if val:
        record["val"] = {"n": len(val), **detection_scores(model, task, val)}
    write_once(model, lambda: _save(model, tokenizer, out, record))  # one process writes, as every task's end
    return model


def _save(model: Florence2ForConditionalGeneration, tokenizer, out: Path, record: dict) -> None:
    with quiet_library():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / RECORD_FILE, record)
