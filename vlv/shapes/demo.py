"""``vlv demo``: the main job on the embedded default. Distil the shipped shapes teacher, caption, reconstruct.

One run dir, one folder per stage, each usable by the other commands as it is::

    RUN/data/{train,test}   shapes scenes (image-caption folders)
    RUN/teacher/            the teacher (shapes-teacher, the UNet; or shapes-teacher-sd3, ``--teacher``), copied
    RUN/lm/                 the shapes LM, pre-trained on the training captions (vlv train lm)
    RUN/stage1/             the VLV encoder distilled from the teacher, images only (vlv train stage1)
    RUN/stage2/             the captioner on the frozen stage-1 embeddings (vlv train stage2)
    RUN/metrics.json, RUN/report.html, RUN/report/

What runs is a demo recipe (``vlv/recipes/demo/*.json``): scene counts, and per stage a training recipe with
overrides, fixed step counts included, so a re-run on one machine gives the same numbers. The recipe's
``reference_minutes`` (each part's wall time on the machine README quotes) give the whole run's ETA, rescaled by
the pace measured so far. With ``--minutes`` the run targets a wall time instead: data and evaluation take a
fixed reserve, the rest is split among the three training stages by their shares, and each stage fixes its step
count from its own measured pace (``TrainConfig.budget_minutes``), so the results depend on the machine (the
run records ``budget_minutes`` and the page says so). A finished stage is skipped on a re-run; a killed one
resumes from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from vlv.checks import check_checkpoints
from vlv.errors import InvalidInput
from vlv.modeling import write_json
from vlv.shapes.data import write_shapes
from vlv.shapes.evaluate import EvalSettings, evaluate_run, finished, headline
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.shipped import resolve_decoder
from vlv.training.loop import TrainConfig
from vlv.training.recipes import RENAMED, load_recipe, resolved, section

STAGES = ("lm", "stage1", "stage2")


def demo_recipe(name: str) -> dict[str, Any]:
    """A demo recipe by name (``default``, ``quick``: ``vlv/recipes/demo/``) or file; it names one per stage."""
    recipe = load_recipe(name, "demo")
    missing = [s for s in STAGES if s not in recipe.get("stages", {})]
    if missing:
        raise InvalidInput(f"demo recipe {name!r} names no recipe for {', '.join(missing)}")
    return recipe


def stage_recipe(demo: dict[str, Any], stage: str, budget: float | None) -> tuple[dict[str, Any], TrainConfig]:
    """A stage's training recipe with the demo's overrides, and its loop config (budgeted when ``budget``)."""
    entry = demo["stages"][stage]
    recipe = load_recipe(entry["recipe"], stage)  # the stages are named as the tasks, so a name is of its folder
    train = {**recipe.get("train", {}), **entry.get("train", {})}
    recipe = {**recipe, "train": train, "settings": {**recipe.get("settings", {}), **entry.get("settings", {})}}
    # A budgeted run plans its own count after a few steps: the recipe's steps are moot.
    return recipe, section(recipe, "train", TrainConfig, {"budget_minutes": budget})


def _stage_lm(run: Path, demo: dict[str, Any], budget: float | None) -> None:
    from vlv.training.lm import LMSettings, train_lm

    recipe, cfg = stage_recipe(demo, "lm", budget)
    settings = section(recipe, "settings", LMSettings, data=str(run / "data" / "train"))
    if train_lm(settings, cfg, run / "lm", tokenizer=build_shapes_tokenizer(),
                recipe=resolved(recipe, train=cfg, settings=settings)) is None:
        raise InterruptedError("language model")


def _stage1(run: Path, demo: dict[str, Any], budget: float | None) -> None:
    from vlv.training.stage1 import Stage1Settings, train_stage1

    recipe, cfg = stage_recipe(demo, "stage1", budget)
    settings = section(recipe, "settings", Stage1Settings, decoder=str(run / "teacher"),
                       data=str(run / "data" / "train"))
    if train_stage1(settings, cfg, run / "stage1", recipe=resolved(recipe, train=cfg, settings=settings)) is None:
        raise InterruptedError("stage 1")


def _stage2(run: Path, demo: dict[str, Any], budget: float | None) -> None:
    from vlv.training.stage2 import Stage2Settings, train_stage2

    recipe, cfg = stage_recipe(demo, "stage2", budget)
    settings = section(recipe, "settings", Stage2Settings, decoder=str(run / "teacher"),
                       encoder=str(run / "stage1"), lm=str(run / "lm"), data=str(run / "data" / "train"))
    if train_stage2(settings, cfg, run / "stage2", recipe=resolved(recipe, train=cfg, settings=settings)) is None:
        raise InterruptedError("stage 2")


def _copy_teacher(run: Path, teacher: str) -> None:
    if (run / "teacher" / "model_index.json").is_file():
        return
    src = resolve_decoder(teacher)
    tmp = run / "teacher.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(run / "teacher")


def _data(run: Path, demo: dict[str, Any]) -> None:
    for split, n in (("train", demo["train_scenes"]), ("test", demo["test_scenes"])):
        folder = run / "data" / split
        done = folder / "dataset.json"
        if not (done.exists() and json.loads(done.read_text()).get("n") == n):
            write_shapes(folder, n=n, seed=0, split=split)


def _check_stages(run: Path, meta: dict[str, Any], name: str, teacher: str) -> None:
    """A run dir holds one demo recipe's stages: a stage another recipe made (finished or not) is never reused
    or resumed by this one, since its numbers would be reported as this recipe's; nor is another teacher."""
    held = meta.get("teacher_name", "shapes-teacher")  # a run dir from before --teacher: the UNet teacher
    if (run / "teacher").is_dir() and held != teacher:
        raise InvalidInput(f"{run} holds the teacher {held!r}, this run distils {teacher!r}: use another --out")
    made = {s: meta.get("stages", {}).get(s) or (meta.get("recipe") if finished(run, s) else None) for s in STAGES}
    made = {s: RENAMED.get(r, r) for s, r in made.items()}  # a run dir from before recipes were named per task
    other = {s: r for s, r in made.items() if r is not None and r != name}
    if other:
        stages = ", ".join(f"{s} by {r!r}" for s, r in other.items())
        raise InvalidInput(f"{run} holds stages another demo recipe made ({stages}), not {name!r}: use another "
                           "--out, or run that recipe")


def run_demo(out: Path, recipe: str = "default", minutes: float | None = None,
             teacher: str | None = None) -> dict[str, Any]:
    """Run (or resume) the demo recipe ``recipe`` into ``out``, distilling ``teacher`` (None: the recipe's, else
    ``shapes-teacher``); returns the metrics written to out/metrics.json."""
    demo, run = demo_recipe(recipe), Path(out)
    check_checkpoints(run)
    total = minutes if minutes is not None else demo.get("minutes")
    reserve = demo.get("reserve_minutes", 0.0)
    if total is not None and "share" not in demo["stages"]["stage1"]:
        raise InvalidInput(f"demo recipe {demo['name']!r} has no time shares for its stages: it cannot run on "
                           "--minutes")
    if total is not None and total <= reserve:
        raise InvalidInput(f"--minutes must exceed the {reserve} minutes data and evaluation take")
    teacher = teacher or demo.get("teacher", "shapes-teacher")
    resolve_decoder(teacher)  # not shipped in this install: one line, before anything runs
    meta_file = run / "metrics.json"
    _check_stages(run, _read(meta_file), demo["name"], teacher)
    run.mkdir(parents=True, exist_ok=True)
    train_minutes = None if total is None else total - reserve
    timings: dict[str, float] = _read(meta_file).get("timings", {})

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        finally:  # a stopped stage's time counts too: a resumed run adds to it
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
            write_json(meta_file, {**_read(meta_file), "recipe": demo["name"], "teacher_name": teacher,
                                   "budget_minutes": total, "timings": timings})

    plan = [("data", lambda: _data(run, demo), lambda: False),
            ("teacher", lambda: _copy_teacher(run, teacher), lambda: False)]
    for stage, fn in (("lm", _stage_lm), ("stage1", _stage1), ("stage2", _stage2)):
        budget = None if train_minutes is None else train_minutes * demo["stages"][stage]["share"]
        plan.append((stage, lambda fn=fn, budget=budget: fn(run, demo, budget),
                     lambda stage=stage: finished(run, stage)))
    eta = Eta(demo.get("reference_minutes", {}), timings) if total is None else None
    for i, (name, fn, is_done) in enumerate(plan, start=1):
        if is_done():
            print(f"[{i}/{len(plan) + 1}] {name}: finished earlier, skipped")
            continue
        print(f"[{i}/{len(plan) + 1}] {name}" + (eta.line(name) if eta else ""), flush=True)
        if name in STAGES:  # which recipe made it, before it starts: a later run with another recipe refuses it
            meta = _read(meta_file)
            write_json(meta_file, {**meta, "stages": {**meta.get("stages", {}), name: demo["name"]}})
        try:
            timed(name, fn)
        except InterruptedError as e:
            raise SystemExit(f"vlv demo: {e} stopped early; run the same command to resume ({run})") from None
    print(f"[{len(plan) + 1}/{len(plan) + 1}] evaluate" + (eta.line("evaluate") if eta else ""), flush=True)
    settings = EvalSettings(n=demo["test_scenes"], examples=demo["examples"])
    # The demo owns its run dir's evaluation: it replaces whatever an earlier `vlv evaluate` left there.
    timed("evaluate", lambda: evaluate_run(run, settings, force=True))
    from vlv.shapes.report import build_report

    metrics = _read(meta_file)
    page = build_report(run)
    _summary(metrics, page)
    return metrics


class Eta:
    """The whole run's time left: each part's reference minutes, scaled by how this machine's finished parts
    compare with theirs. Only parts of a minute or more set the pace (rendering a few seconds of PNGs says
    little of training speed); until one has finished, the reference pace is assumed."""

    def __init__(self, reference: dict[str, float], timings: dict[str, float]):
        self.reference, self.timings = reference, timings

    def pace(self) -> float:
        done = [k for k in self.timings if self.reference.get(k, 0) >= 1.0]
        ref = sum(self.reference[k] for k in done)
        return sum(self.timings[k] for k in done) / 60 / ref if ref else 1.0

    def line(self, part: str) -> str:
        left = [k for k in self.reference if k not in self.timings or k == part]
        if not self.reference or part not in self.reference:
            return ""
        minutes = self.pace() * sum(self.reference[k] for k in left)
        return f" (whole run: about {max(minutes, 0.1):.0f} min left)" if minutes >= 1 else " (under a minute left)"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary(m: dict[str, Any], page: Path) -> None:
    print(headline(m))
    print(f"wall time: {sum(m['timings'].values()) / 60:.1f} min; report: {page}")
