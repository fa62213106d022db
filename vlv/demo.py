"""``vlv demo``: the main job on the embedded default. Distil the shipped shapes teacher, caption, reconstruct.

One run dir, one folder per stage, each usable by the other commands as it is::

    RUN/data/{train,test}   shapes scenes (image-caption folders)
    RUN/teacher/            the shipped teacher, copied (Stable Diffusion layout)
    RUN/lm/                 the shapes LM, pre-trained on the training captions (vlv train lm)
    RUN/stage1/             the VLV encoder distilled from the teacher, images only (vlv train stage1)
    RUN/stage2/             the captioner on the frozen stage-1 embeddings (vlv train stage2)
    RUN/metrics.json, RUN/report.html, RUN/report/

Time: ``--minutes`` is the whole run's target. Data and evaluation take a fixed share; the rest is split
among the three training stages, and each stage fixes its step count from its own measured pace
(``TrainConfig.budget_minutes``), so faster hardware simply trains further. A finished stage is skipped
on a re-run; a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlv.data import atomic_write_text, write_shapes
from vlv.evaluate import EvalSettings, evaluate_run, finished


@dataclass(frozen=True)
class DemoPreset:
    """Sizes and budgets of a demo run."""

    train: int  # training scenes
    test: int  # held-out scenes evaluated
    minutes: float | None  # whole-run target; None: fixed steps (``steps``)
    reserve_minutes: float = 0.0  # data + evaluation, outside the training budget
    shares: dict[str, float] = field(default_factory=lambda: {"lm": 0.08, "stage1": 0.57, "stage2": 0.35})
    steps: dict[str, int] = field(default_factory=lambda: {"lm": 1500, "stage1": 1000, "stage2": 1000})
    batch: dict[str, int] = field(default_factory=lambda: {"lm": 64, "stage1": 32, "stage2": 32})
    examples: int = 16


PRESETS = {
    # Measured on 2 cores: data 4 s + evaluate 169-175 s + the stages' set-up outside their loops (stage 1
    # caches 10,000 VAE latents: ~24 s) ~ 3.5 min; runs took 15:05 (reserve 3.0), 14:54 (3.3), 15:06 (3.4).
    # 45 minutes, most of them stage 1's: from scratch a shapes encoder needs well over 1,000 steps of batch 64
    # (26.5% after 1,400; 30-minute runs reached 56-89% over 5 seeds; a 15-minute demo with the old init: 0%),
    # while the LM's loss flattens within a minute and stage 2 reached 93.5% captions in 12 minutes on the
    # shipped encoder. Measured at 45: 44:40 wall, reconstruction 63.8%, captions 99.8%.
    "default": DemoPreset(train=10_000, test=500, minutes=45.0, reserve_minutes=3.8,
                          shares={"lm": 0.03, "stage1": 0.67, "stage2": 0.30},
                          batch={"lm": 64, "stage1": 64, "stage2": 32}),
    "quick": DemoPreset(train=256, test=16, minutes=None, steps={"lm": 20, "stage1": 6, "stage2": 6},
                        batch={"lm": 16, "stage1": 8, "stage2": 8}, examples=4),
}
LR = {"lm": 1e-3, "stage1": 1e-3, "stage2": 5e-4}
HIGH_NOISE_FRACTION = 0.25  # stage-1 timestep emphasis on the layout half (the teacher's own recipe)


def _train_config(preset: DemoPreset, stage: str, budget: float | None):
    from vlv.train import TrainConfig

    steps = 10**9 if budget else preset.steps[stage]  # a budgeted run plans its own count after a few steps
    return TrainConfig(steps=steps, batch_size=preset.batch[stage], lr=LR[stage], betas=(0.9, 0.99),
                       weight_decay=0.01, warmup_steps=100 if budget else 1, budget_minutes=budget,
                       checkpoint_minutes=2.0)


def _stage_lm(run: Path, preset: DemoPreset, budget: float | None) -> None:
    from vlv.lm import LMSettings, train_lm

    if train_lm(LMSettings(data=str(run / "data" / "train")), _train_config(preset, "lm", budget), run / "lm") is None:
        raise InterruptedError("language model")


def _stage1(run: Path, preset: DemoPreset, budget: float | None) -> None:
    from vlv.stage1 import Stage1Settings, train_stage1

    settings = Stage1Settings(decoder=str(run / "teacher"), data=str(run / "data" / "train"),
                              high_noise_fraction=HIGH_NOISE_FRACTION)
    if train_stage1(settings, _train_config(preset, "stage1", budget), run / "stage1") is None:
        raise InterruptedError("stage 1")


def _stage2(run: Path, preset: DemoPreset, budget: float | None) -> None:
    from vlv.stage2 import Stage2Settings, train_stage2

    settings = Stage2Settings(decoder=str(run / "teacher"), encoder=str(run / "stage1"), lm=str(run / "lm"),
                              data=str(run / "data" / "train"), trainable="mlp+llm+encoder")
    if train_stage2(settings, _train_config(preset, "stage2", budget), run / "stage2") is None:
        raise InterruptedError("stage 2")


def _copy_teacher(run: Path) -> None:
    from vlv.presets import resolve_decoder

    if (run / "teacher" / "model_index.json").is_file():
        return
    src = resolve_decoder("shapes-teacher")  # FileNotFoundError with a clear message when not shipped
    tmp = run / "teacher.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(run / "teacher")


def _data(run: Path, preset: DemoPreset) -> None:
    for split, n in (("train", preset.train), ("test", preset.test)):
        folder = run / "data" / split
        done = folder / "dataset.json"
        if not (done.exists() and json.loads(done.read_text()).get("n") == n):
            write_shapes(folder, n=n, seed=0, split=split)


def run_demo(out: Path, preset: str = "default", minutes: float | None = None) -> dict[str, Any]:
    """Run (or resume) the demo into ``out``; returns the metrics written to out/metrics.json."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    p, run = PRESETS[preset], Path(out)
    run.mkdir(parents=True, exist_ok=True)
    total = minutes if minutes is not None else p.minutes
    if total is not None and total <= p.reserve_minutes:
        raise ValueError(f"--minutes must exceed the {p.reserve_minutes} minutes data and evaluation take")
    train_minutes = None if total is None else total - p.reserve_minutes
    meta_file = run / "metrics.json"
    timings: dict[str, float] = _read(meta_file).get("timings", {})

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        finally:  # a stopped stage's time counts too: a resumed run adds to it
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
            metrics = {**_read(meta_file), "preset": preset, "timings": timings}
            atomic_write_text(meta_file, json.dumps(metrics, indent=2) + "\n")

    plan = [("data", lambda: _data(run, p), lambda: False), ("teacher", lambda: _copy_teacher(run), lambda: False)]
    for stage, fn in (("lm", _stage_lm), ("stage1", _stage1), ("stage2", _stage2)):
        budget = None if train_minutes is None else train_minutes * p.shares[stage]
        plan.append((stage, lambda fn=fn, budget=budget: fn(run, p, budget), lambda stage=stage: finished(run, stage)))
    for i, (name, fn, is_done) in enumerate(plan, start=1):
        if is_done():
            print(f"[{i}/{len(plan) + 1}] {name}: finished earlier, skipped")
            continue
        print(f"[{i}/{len(plan) + 1}] {name}")
        try:
            timed(name, fn)
        except InterruptedError as e:
            raise SystemExit(f"vlv demo: {e} stopped early; run the same command to resume ({run})") from None
    print(f"[{len(plan) + 1}/{len(plan) + 1}] evaluate")
    settings = EvalSettings(n=p.test, examples=p.examples)
    timed("evaluate", lambda: evaluate_run(run, settings))
    from vlv.report import build_report

    metrics = _read(meta_file)
    page = build_report(run)
    _summary(metrics, page)
    return metrics


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary(m: dict[str, Any], page: Path) -> None:
    line = [f"{k} {v['scene_accuracy']:.1%}" for k, v in m.items()
            if isinstance(v, dict) and "scene_accuracy" in v]
    print("held-out scene accuracy: " + ", ".join(line))
    print(f"wall time: {sum(m['timings'].values()) / 60:.1f} min; report: {page}")
