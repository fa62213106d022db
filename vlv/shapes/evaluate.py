"""Held-out measures of a VLV run dir (``vlv demo``'s layout): what the report page shows, from saved files.

A run dir holds ``data/``, ``teacher/`` (Stable Diffusion layout), ``lm/``, ``stage1/``, ``stage2/``.
:func:`evaluate_run` measures every stage that has finished, on one split of shapes scenes:

- teacher:        the teacher's samples from the true captions, read back by the detector (the ceiling);
- reconstruction: image -> z = E(x) -> teacher -> detector (stage 1, paper Sec. 3.1);
- captions:       image -> captioner -> caption grammar (stage 2);
- caption_to_image: the predicted captions -> teacher -> detector (paper Table 1 analogue);

and writes ``metrics.json`` plus the pictures the page shows (``report/*.png``). Numbers in the page come
from this file only. The shown examples are also redrawn and captioned by the shipped, fully trained weights
(when installed), so the page shows what the method reaches beside what this run's budget reached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlv.captioner import Captioner
from vlv.data.datasets import InMemory
from vlv.data.images import to_pil
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import make_pipeline, sample
from vlv.encoder import VLVEncoder
from vlv.inference import caption_images, compose_images, reconstruct_images
from vlv.modeling import write_json
from vlv.shapes import world
from vlv.shapes.data import write_shapes
from vlv.shipped import SHIPPED, installed, resolve_decoder, resolve_encoder, resolve_stage2

METRICS_FILE, ASSETS = "metrics.json", "report"
STAGES = ("lm", "stage1", "stage2")
FINISHED = {"lm": "config.json", "stage1": "encoder.json", "stage2": "captioner.json"}  # written last


@dataclass
class EvalSettings:
    """How a run is measured; the defaults are the report's."""

    split: str = "test"
    n: int = 500
    sampler: str = "fast"  # DPM-Solver++ 20 steps (reconstruction and teacher alike)
    guidance_scale: float = 2.0  # the paper's reconstruction CFG, used for the teacher too: same footing
    num_beams: int = 1  # greedy captions
    examples: int = 16  # test images shown in the page
    compositions: int = 4
    seed: int = 0


def finished(run: Path, stage: str) -> bool:
    """A stage is finished when its final artefact exists (written only after its last step)."""
    return (Path(run) / stage / FINISHED[stage]).is_file()


def split_data(run: Path, split: str, n: int, size: int) -> InMemory:
    """run/data/<split>, made on first use (the demo makes test; another split is rendered on demand)."""
    folder = Path(run) / "data" / split
    if not (folder / "captions.jsonl").is_file():
        write_shapes(folder, n=n, seed=0, split=split, progress=False)
    data = InMemory.of(folder, size, limit=n)
    return data


def _scores(images: list[Image.Image], truths: list[set]) -> dict[str, float]:
    return world.score([world.detect(im) for im in images], truths).as_dict()


def loss_curves(run: Path) -> dict[str, list[list[float]]]:
    """(step, smoothed loss) per trained stage, from each checkpoint's trainer.json history."""
    curves = {}
    for stage in STAGES:
        meta = Path(run) / stage / "checkpoint" / "trainer.json"
        if meta.is_file():
            history = json.loads(meta.read_text())["history"]
            curves[stage] = [[row["step"], round(row["loss"], 5)] for row in history if "loss" in row]
    return curves


def accuracy_curve(record: dict[str, Any]) -> dict[str, Any]:
    """Validation reconstruction accuracy against cumulative training minutes, over every phase of a record.

    A shipped ``training.json`` nests the run it was warm-started from under ``init`` (and so on): the phases
    are laid end to end, oldest first, each one's evaluations offset by the wall time of those before it, so
    the curve reads as "accuracy after this many minutes of training in all". Each phase keeps its command
    and note (which say where it ran: the minutes of a GPU phase are not CPU minutes).
    """
    chain = []
    while record:
        chain.append(record)
        record = record.get("init")
    points, phases, offset = [], [], 0.0
    for phase in reversed(chain):
        for row in phase.get("history", []):
            if "eval" in row and "recon_scene_accuracy" in row["eval"]:
                ev = row["eval"]
                points.append([round((offset + ev["elapsed_s"]) / 60, 2), ev["recon_scene_accuracy"]])
        phases.append({"steps": phase.get("steps"), "minutes": round(phase.get("wall_s", 0.0) / 60, 1),
                       "command": phase.get("command"), "note": phase.get("note")})
        offset += phase.get("wall_s", 0.0)
    return {"points": points, "phases": phases}


def shipped_metrics() -> dict[str, Any]:
    """The benchmark numbers recorded beside each shipped weight set (``metrics.json`` in its dir); stage 1's
    also carry its :func:`accuracy_curve`, from the ``training.json`` beside them."""
    out = {}
    for name, (path, _) in SHIPPED.items():
        if (path / "metrics.json").is_file():
            out[name] = json.loads((path / "metrics.json").read_text())
            if name == "shapes-stage1" and (path / "training.json").is_file():
                out[name]["accuracy_curve"] = accuracy_curve(json.loads((path / "training.json").read_text()))
    return out


@torch.no_grad()
def check_run(run: Path) -> None:
    """A demo run dir: its teacher complete, and each stage it holds readable (nothing is loaded)."""
    if not (run / "teacher" / "model_index.json").is_file():
        raise FileNotFoundError(f"{run} is not a VLV run dir (no teacher/model_index.json)")
    resolve_decoder(run / "teacher")
    for part, resolve in (("stage1", resolve_encoder), ("stage2", resolve_stage2)):
        if (run / part).is_dir():
            resolve(run / part)


def evaluate_run(run: Path, settings: EvalSettings | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every finished stage of ``run``; write run/metrics.json (keeping its timings) and run/report/."""
    from vlv.progress import tqdm

    settings, run = settings or EvalSettings(), Path(run)
    check_run(run)
    assets = run / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    decoder = DiffusionDecoder.from_pretrained(run / "teacher")
    pipe = make_pipeline(decoder.vae, decoder.text_encoder, decoder.tokenizer, decoder.unet, decoder.scheduler)
    data = split_data(run, settings.split, settings.n, decoder.image_size)
    truths = [world.parse_caption(c) for c in data.captions]
    images = data.images  # (N, H, W, 3) uint8: each model cuts them by its encoder's transform
    kw = {"guidance_scale": settings.guidance_scale, "sampler": settings.sampler, "seed": settings.seed}
    steps = [s for s in ("teacher", "stage1", "stage2") if s == "teacher" or finished(run, s)]
    bar = tqdm(total=len(steps) + finished(run, "stage2"), desc="evaluate", unit="part", disable=not progress)
    metrics: dict[str, Any] = {"settings": asdict(settings), "n": len(data)}
    shown = list(range(min(settings.examples, len(data))))
    examples = [{"index": i, "caption": data.captions[i]} for i in shown]
    for i in shown:
        Image.fromarray(images[i]).save(assets / f"input_{i}.png")

    teacher_images = sample(pipe, data.captions, **kw)
    metrics["teacher"] = _scores(teacher_images, truths)
    for i in shown:
        teacher_images[i].save(assets / f"teacher_{i}.png")
    bar.update()

    if finished(run, "stage1"):
        encoder = VLVEncoder.from_pretrained(run / "stage1").eval()
        recon = to_pil(reconstruct_images(encoder, decoder, images, sampler=settings.sampler,
                                          guidance_scale=settings.guidance_scale, seed=settings.seed))
        metrics["reconstruction"] = _scores(recon, truths)
        metrics["reconstruction"]["of_teacher"] = _ratio(metrics["reconstruction"], metrics["teacher"])
        for i in shown:
            recon[i].save(assets / f"recon_{i}.png")
        metrics["compositions"] = _compositions(encoder, decoder, images, settings, assets)
        bar.update()

    if finished(run, "stage2"):
        captioner = Captioner.from_pretrained(run / "stage2").eval()
        preds = caption_images(captioner, images, num_beams=settings.num_beams)
        read = [world.parse_caption(p) for p in preds]
        metrics["captions"] = {**world.score(read, truths).as_dict(),
                               "exact": float(np.mean([p == t for p, t in zip(preds, data.captions, strict=True)])),
                               "well_formed": float(np.mean([world.is_well_formed(p) for p in preds]))}
        for row in examples:
            row["predicted"] = preds[row["index"]]
        bar.update()
        metrics["caption_to_image"] = _scores(sample(pipe, preds, **kw), truths)  # Table 1 analogue
        bar.update()
    bar.close()
    _shipped_examples(images[shown], examples, settings, assets)
    metrics["examples"] = examples
    metrics["curves"] = loss_curves(run)
    metrics["shipped"] = shipped_metrics()
    old = json.loads((run / METRICS_FILE).read_text()) if (run / METRICS_FILE).is_file() else {}
    metrics = {**{k: old[k] for k in ("timings", "recipe", "stages", "budget_minutes") if k in old}, **metrics}
    write_json(run / METRICS_FILE, metrics)
    return metrics


def _shipped_examples(images: np.ndarray, examples: list[dict[str, Any]], settings: EvalSettings,
                      assets: Path) -> None:
    """The shown images through the shipped stage 1 (-> shipped teacher) and stage 2: ``shipped_recon_<i>.png``
    and each example's ``shipped_predicted``. Skipped for parts this install does not ship."""
    if not len(images):
        return
    if installed("shapes-stage1") and installed("shapes-teacher"):
        encoder = VLVEncoder.from_pretrained("shapes-stage1").eval()
        decoder = DiffusionDecoder.from_pretrained("shapes-teacher")
        recon = to_pil(reconstruct_images(encoder, decoder, images, sampler=settings.sampler,
                                          guidance_scale=settings.guidance_scale, seed=settings.seed))
        for row, im in zip(examples, recon, strict=True):
            im.save(assets / f"shipped_recon_{row['index']}.png")
    if all(installed(n) for n in ("shapes-stage1", "shapes-teacher", "shapes-stage2", "shapes-lm")):
        preds = caption_images(Captioner.from_pretrained("shapes-stage2").eval(), images, num_beams=settings.num_beams)
        for row, pred in zip(examples, preds, strict=True):
            row["shipped_predicted"] = pred


def _ratio(a: dict[str, float], b: dict[str, float]) -> float | None:
    return round(a["scene_accuracy"] / b["scene_accuracy"], 4) if b["scene_accuracy"] else None


def _compositions(encoder, decoder, images: np.ndarray, settings: EvalSettings, assets: Path) -> list[dict[str, Any]]:
    """Paper Fig. 6: the first k = Nq/2 embeddings of image a and of image b, decoded together."""
    n = min(settings.compositions, len(images) // 2)
    if n == 0:
        return []
    a, b = images[:n], images[n : 2 * n]
    k = encoder.config.num_queries // 2
    mixed = compose_images(encoder, decoder, a, b, k, sampler=settings.sampler,
                           guidance_scale=settings.guidance_scale, seed=settings.seed)  # (n, 3, H, W)
    rows = []
    pil = [Image.fromarray(x) for x in (*a, *b)]
    for j, (im_a, im_b, im_m) in enumerate(zip(pil[:n], pil[n:], to_pil(mixed), strict=True)):
        for tag, im in (("a", im_a), ("b", im_b), ("mix", im_m)):
            im.save(assets / f"compose_{j}_{tag}.png")
        rows.append({"index": j, "k": k})
    return rows
