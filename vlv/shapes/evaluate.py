"""Held-out measures of a VLV run dir (``vlv demo``'s layout): what the report page shows, from saved files.

A run dir holds ``data/``, ``teacher/`` (Stable Diffusion layout), ``lm/``, ``stage1/``, ``stage2/``.
:func:`evaluate_run` measures every stage that has finished, on one split of shapes scenes:

- teacher:        the teacher's samples from the true captions, read back by the detector (the ceiling);
- reconstruction: image -> z = E(x) -> teacher -> detector (stage 1, paper Sec. 3.1);
- captions:       image -> captioner -> caption grammar (stage 2);
- caption_to_image: the predicted captions -> teacher -> detector (paper Table 1 analogue);

and writes ``metrics.json`` plus the pictures the page shows (``report/*.png``), into the run dir or another
folder. Numbers in the page come from this file only. The page shows the first scenes where this run is right
and the first where it is wrong (by scene index, so a run always shows the same ones), each also redrawn and
captioned by the shipped, fully trained weights (when installed): what the method reaches beside what this
run's budget reached.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlv.captioner import Captioner
from vlv.checks import check_out
from vlv.data.datasets import InMemory
from vlv.data.images import to_pil
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.errors import InvalidInput
from vlv.inference import caption_images, compose_images, reconstruct_images
from vlv.modeling import atomic_save_png, write_json
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
    sampler: str = "fast"  # the family's fast sampler at its default step count, for reconstruction and teacher alike
    guidance_scale: float = 2.0  # the paper's reconstruction CFG, used for the teacher too: same footing
    num_beams: int = 1  # greedy captions
    examples: int = 16  # test scenes shown in the page
    failures: int = 6  # of them, at most this many where this run is wrong (the rest where it is right)
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


def _measure(reads: list[set], truths: list[set]) -> tuple[dict[str, float], list[bool]]:
    """The scores of read-back scenes, and per scene whether it is exactly right (what scene accuracy counts)."""
    return world.score(reads, truths).as_dict(), [r == t for r, t in zip(reads, truths, strict=True)]


def _detected(images: list[Image.Image]) -> list[set]:
    return [world.detect(im) for im in images]


def scene_count(run: Path, settings: EvalSettings) -> int:
    """How many scenes an evaluation will measure, known before anything is loaded or rendered."""
    index = Path(run) / "data" / settings.split / "captions.jsonl"
    if not index.is_file():
        return settings.n  # split_data renders exactly n
    with index.open(encoding="utf-8", errors="replace") as f:
        return min(settings.n, sum(1 for line in f if line.strip()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path} is not valid JSON ({e}): pass --force to replace it") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} is not a JSON object: pass --force to replace it")
    return data


def _run_record(run: Path, force: bool) -> dict[str, Any]:
    """What the run itself recorded in its metrics.json (timings, recipe), kept in the new one."""
    try:
        return _read_json(run / METRICS_FILE)
    except InvalidInput:
        if force:
            return {}
        raise


def check_replace(out: Path, n: int, force: bool = False) -> None:
    """Never replace an evaluation of more scenes by one of fewer unasked: the larger is the better estimate."""
    if force:
        return
    old = _read_json(Path(out) / METRICS_FILE).get("n")
    if isinstance(old, int) and old > n:
        raise InvalidInput(f"{Path(out) / METRICS_FILE} holds an evaluation of {old} scenes, this one measures {n}: "
                           "pass --force to replace it, or --out another folder")


HEADLINE = (("teacher", "teacher"), ("reconstruction", "reconstruction"), ("captions", "captions"),
            ("caption_to_image", "caption -> image"))


def headline(m: dict[str, Any]) -> str:
    """The metrics in one line: each part's scene accuracy, with the scene count they share."""
    parts = [f"{label} {m[key]['scene_accuracy']:.1%}" for key, label in HEADLINE if key in m]
    return f"scene accuracy on {m['n']} held-out {m['settings']['split']} scenes: " + ", ".join(parts)


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


def evaluate_run(run: Path, settings: EvalSettings | None = None, progress: bool = True, out: Path | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Measure every finished stage of ``run``; write out/metrics.json (keeping the run's timings) and out/report/.

    ``out`` defaults to the run dir. An evaluation of more scenes already in ``out`` is refused unless ``force``.
    """
    from vlv.progress import tqdm

    settings, run = settings or EvalSettings(), Path(run)
    out = run if out is None else Path(out)
    check_run(run)
    check_out(out, flag="--out", is_dir=True)
    check_replace(out, scene_count(run, settings), force)
    record = _run_record(run, force)
    decoder = DiffusionDecoder.from_pretrained(run / "teacher")
    data = split_data(run, settings.split, settings.n, decoder.image_size)
    truths = [world.parse_caption(c) for c in data.captions]
    images = data.images  # (N, H, W, 3) uint8: each model cuts them by its encoder's transform
    kw = {"guidance_scale": settings.guidance_scale, "sampler": settings.sampler, "seed": settings.seed}
    steps = [s for s in ("teacher", "stage1", "stage2") if s == "teacher" or finished(run, s)]
    bar = tqdm(total=len(steps) + finished(run, "stage2"), desc="evaluate", unit="part", disable=not progress)
    metrics: dict[str, Any] = {"run": run.resolve().name, "settings": asdict(settings), "n": len(data)}
    passed: dict[str, list[bool]] = {}
    drawn: dict[str, list[Image.Image]] = {}  # kind -> one image per scene, for the shown ones' PNGs
    reads: dict[str, list[set]] = {}  # drawing part -> what the detector read in each

    drawn["teacher"] = decoder.generate(data.captions, **kw)
    reads["teacher"] = _detected(drawn["teacher"])
    metrics["teacher"], passed["teacher"] = _measure(reads["teacher"], truths)
    bar.update()

    encoder = None
    if finished(run, "stage1"):
        encoder = VLVEncoder.from_pretrained(run / "stage1").eval()
        drawn["recon"] = to_pil(reconstruct_images(encoder, decoder, images, sampler=settings.sampler,
                                                   guidance_scale=settings.guidance_scale, seed=settings.seed))
        reads["reconstruction"] = _detected(drawn["recon"])
        metrics["reconstruction"], passed["reconstruction"] = _measure(reads["reconstruction"], truths)
        metrics["reconstruction"]["of_teacher"] = _ratio(metrics["reconstruction"], metrics["teacher"])
        bar.update()

    preds = None
    if finished(run, "stage2"):
        captioner = Captioner.from_pretrained(run / "stage2").eval()
        preds = caption_images(captioner, images, num_beams=settings.num_beams)
        scores, passed["captions"] = _measure([world.parse_caption(p) for p in preds], truths)
        metrics["captions"] = {**scores,
                               "exact": float(np.mean([p == t for p, t in zip(preds, data.captions, strict=True)])),
                               "well_formed": float(np.mean([world.is_well_formed(p) for p in preds]))}
        bar.update()
        metrics["caption_to_image"] = _scores(decoder.generate(preds, **kw), truths)  # Table 1 analogue
        bar.update()
    bar.close()

    metrics["failed_scenes"] = {part: [i for i, ok in enumerate(oks) if not ok] for part, oks in passed.items()}
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    drawn["input"] = [Image.fromarray(x) for x in images]
    examples = []
    for i, failed in pick_examples(passed, settings):
        row = {"index": i, "caption": data.captions[i], "failed": failed,
               "passed": {part: oks[i] for part, oks in passed.items()},
               "misread": {part: _misread(r[i], truths[i]) for part, r in reads.items() if r[i] != truths[i]}}
        if preds is not None:
            row["predicted"] = preds[i]
        for kind, pictures in drawn.items():
            atomic_save_png(pictures[i], assets / f"{kind}_{i}.png")
        examples.append(row)
    if encoder is not None:
        metrics["compositions"] = _compositions(encoder, decoder, images, settings, assets)
    _shipped_examples(images[[row["index"] for row in examples]], examples, truths, settings, assets)
    _prune(assets, examples, metrics.get("compositions", []))
    metrics["examples"] = examples
    metrics["curves"] = loss_curves(run)
    metrics["shipped"] = shipped_metrics()
    kept = ("timings", "recipe", "teacher_name", "stages", "budget_minutes")
    metrics = {**{k: record[k] for k in kept if k in record}, **metrics}
    write_json(out / METRICS_FILE, metrics)
    return metrics


def _misread(read: set, truth: set) -> dict[str, list[str]]:
    """How a drawing was read wrong: the objects the detector saw that are not in the scene, and those it missed."""
    return {"extra": sorted(world.phrase(f) for f in read - truth),
            "missed": sorted(world.phrase(f) for f in truth - read)}


def _scores(images: list[Image.Image], truths: list[set]) -> dict[str, float]:
    return world.score(_detected(images), truths).as_dict()


def pick_examples(passed: dict[str, list[bool]], settings: EvalSettings) -> list[tuple[int, bool]]:
    """(scene, failed) for the page: the first scenes where this run is right, then the first ``failures``
    where it is wrong, by scene index (deterministic). Wrong means a part this run trained is wrong
    (reconstruction or caption); with neither trained, the teacher. Too few of one kind: more of the other."""
    parts = [p for p in ("reconstruction", "captions") if p in passed] or ["teacher"]
    n = len(passed[parts[0]])
    bad = [i for i in range(n) if not all(passed[p][i] for p in parts)]
    good = [i for i in range(n) if all(passed[p][i] for p in parts)]
    shown = min(settings.examples, n)
    good = good[: shown - min(settings.failures, len(bad))]
    bad = bad[: shown - len(good)]
    return [(i, False) for i in good] + [(i, True) for i in bad]


_ASSET = re.compile(r"(input|teacher|recon|shipped_recon)_(\d+)\.png|compose_(\d+)_(a|b|mix)\.png")


def _prune(assets: Path, examples: list[dict[str, Any]], compositions: list[dict[str, Any]]) -> None:
    """Drop the PNGs an earlier evaluation showed and this one does not (only names this module writes)."""
    shown = {str(row["index"]) for row in examples}
    mixed = {str(c["index"]) for c in compositions}
    for path in assets.glob("*.png"):
        m = _ASSET.fullmatch(path.name)
        if m and not (m.group(2) in shown if m.group(1) else m.group(3) in mixed):
            path.unlink()


def _shipped_examples(images: np.ndarray, examples: list[dict[str, Any]], truths: list[set],
                      settings: EvalSettings, assets: Path) -> None:
    """The shown images through the shipped stage 1 (-> shipped teacher) and stage 2: ``shipped_recon_<i>.png``
    and each example's ``shipped_predicted``, each marked right or wrong. Skipped for parts this install does
    not ship."""
    if not len(images):
        return
    truth = [truths[row["index"]] for row in examples]
    if installed("shapes-stage1") and installed("shapes-teacher"):
        encoder = VLVEncoder.from_pretrained("shapes-stage1").eval()
        decoder = DiffusionDecoder.from_pretrained("shapes-teacher")
        recon = to_pil(reconstruct_images(encoder, decoder, images, sampler=settings.sampler,
                                          guidance_scale=settings.guidance_scale, seed=settings.seed))
        for row, im, t in zip(examples, recon, truth, strict=True):
            atomic_save_png(im, assets / f"shipped_recon_{row['index']}.png")
            read = world.detect(im)
            row["passed"]["shipped_reconstruction"] = read == t
            if read != t:
                row["misread"]["shipped_reconstruction"] = _misread(read, t)
    if all(installed(n) for n in ("shapes-stage1", "shapes-teacher", "shapes-stage2", "shapes-lm")):
        preds = caption_images(Captioner.from_pretrained("shapes-stage2").eval(), images, num_beams=settings.num_beams)
        for row, pred, t in zip(examples, preds, truth, strict=True):
            row["shipped_predicted"] = pred
            row["passed"]["shipped_captions"] = world.parse_caption(pred) == t


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
            atomic_save_png(im, assets / f"compose_{j}_{tag}.png")
        rows.append({"index": j, "k": k})
    return rows
