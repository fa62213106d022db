"""Maintainer tool: copy a finished shapes run into the package as shipped weights (``vlv/weights/<name>``).

    python scripts/ship.py stage1 runs/ship/stage1 --command "vlv train stage1 ..." [--metrics bench.json]
        [--init-command "..." --init-note "..."]   # a run warm-started with --init: its first phase is recorded too
        [--keep-ablations "measured on the previous weights"]  # carry the replaced weights' ablations over
    python scripts/ship.py lm runs/ship/lm --command "vlv train lm ..."
    python scripts/ship.py stage2 runs/ship/stage2 --command "vlv train stage2 ..." [--metrics bench.json]
    python scripts/ship.py metrics stage1 bench.json      # (re)attach benchmark numbers to shipped weights
    python scripts/ship.py ablation stage2 levels levels.json --note "4 min each, ..."  # Table 4/7 analogues

What ships: the run's config files and its trained weights as fp16 safetensors (the loaders cast to fp32), and
``training.json``: the command, settings, steps, wall time and the loss/eval curve from the run's checkpoint.
Stage 2 must have been trained from the shipped names (``--encoder shapes-stage1 --lm shapes-lm``) so that its
``stage2.json`` points at the shipped parts. ``metrics.json`` holds the benchmark numbers the report page puts
beside a demo's own: keys ``reconstruction`` (stage 1) and ``captions`` / ``caption_to_image`` (stage 2), and
``ablations`` (benchmarks/stage2.py levels / table7 or stage1.py ablation output, with a note of how they ran),
which the page shows as tables.
The weights dir is written to a temporary dir and swapped in whole.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlv.modeling import atomic_write_text
from vlv.shipped import SHIPPED

KINDS = ("stage1", "lm", "stage2")
SKIP = {"latents.safetensors", "data.json"}  # training records (an old cache, the bad samples met), not weights


def _fp16(src: Path, dst: Path) -> None:
    tensors = load_file(src)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, dst,
              metadata={"format": "pt"})


def _metrics(kind: str, bench: dict) -> dict:
    """Benchmark JSON (benchmarks/stage1.py or stage2.py accuracy) -> the keys the report reads."""
    if kind == "stage1":
        fast = next(v for k, v in bench.items() if k.endswith(":fast"))
        paper = next((v for k, v in bench.items() if k.endswith(":paper")), None)
        return {"reconstruction": fast, "reconstruction_paper_sampler": paper,
                "teacher_true_captions": bench.get("teacher_true_captions"), "n": bench.get("n"), "benchmark": bench}
    if kind == "stage2":
        beams = sorted((k for k in bench if k.startswith("beams")), key=lambda k: int(k[5:]))
        greedy = bench[beams[0]]
        return {"captions": {k: v for k, v in greedy.items() if k != "caption_to_image"},
                "caption_to_image": greedy["caption_to_image"], "n": bench.get("n"), "benchmark": bench}
    raise ValueError(f"no benchmark numbers for {kind}")


def _read_metrics(dest: Path) -> dict:
    """The metrics.json beside shipped weights, or {} where none was recorded yet."""
    path = dest / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def add_ablation(dest: Path, name: str, results: dict, note: str) -> None:
    """Record a benchmark's variants under metrics.json's ``ablations``; the other keys are kept."""
    if not re.fullmatch(r"[a-z0-9-]+", name):
        raise SystemExit(f"ablation name {name!r}: lower-case letters, digits and '-' only (it becomes an HTML id)")
    path = dest / "metrics.json"
    metrics = _read_metrics(dest)
    metrics.setdefault("ablations", {})[name] = {"note": note, "results": results}
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {name} into {path}")


def _init_record(init: Path, command: str | None, note: str | None) -> dict:
    """The training record of the run a warm start began from (its trainer.json, in checkpoint/ or beside).

    A run warm-started from the shipped weights themselves (``--init shapes-stage1``) records their whole
    training.json, its own first phase included, so the chain of phases stays readable after the swap.
    """
    if str(init) in SHIPPED:
        shipped = SHIPPED[str(init)][0] / "training.json"
        return {"run": f"{init} (the weights shipped before this)", "note": note, **json.loads(shipped.read_text())}
    path = next((p for p in (init / "checkpoint" / "trainer.json", init / "trainer.json") if p.is_file()), None)
    if path is None:
        raise SystemExit(f"{init}: no trainer.json to record the warm start's first phase; ship from a full run dir")
    trainer = json.loads(path.read_text())
    settings = json.loads((init / "stage1.json").read_text())["settings"] if (init / "stage1.json").is_file() else None
    return {"run": str(init), "command": command, "note": note, **_summary(trainer), "settings": settings}


def _summary(trainer: dict) -> dict:
    """A run's trainer.json as the training record keeps it."""
    return {"steps": trainer["step"], "wall_s": round(trainer["elapsed_s"], 1), "train": trainer["config"],
            "history": trainer["history"]}


def _kept_ablations(dest: Path, why: str) -> dict:
    """The ablations recorded beside the weights being replaced, each note saying what they were measured on."""
    old = _read_metrics(dest).get("ablations", {})
    return {k: {**v, "note": f"{v['note']} [{why}]"} for k, v in old.items()}


def ship(kind: str, run: Path, command: str, metrics: Path | None, init_command: str | None = None,
         init_note: str | None = None, keep_ablations: str | None = None) -> Path:
    name = f"shapes-{kind}"
    dest = SHIPPED[name][0]
    kept = _kept_ablations(dest, keep_ablations) if keep_ablations else {}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(run.iterdir()):  # configs, tokenizer files, weights; never checkpoint/ (optimizer state)
        if not f.is_file() or f.name in SKIP:
            continue
        if f.suffix == ".safetensors":
            _fp16(f, tmp / f.name)
        else:
            shutil.copy2(f, tmp / f.name)
    if kind == "stage2":
        settings = json.loads((run / "stage2.json").read_text())["settings"]
        if (settings["encoder"], settings["lm"]) != ("shapes-stage1", "shapes-lm"):
            raise SystemExit(f"{run} was not trained from the shipped names: {settings['encoder']}, {settings['lm']}")
    trainer = json.loads((run / "checkpoint" / "trainer.json").read_text())
    record = {"command": command, **_summary(trainer), "torch": torch.__version__, "threads": torch.get_num_threads()}
    init = json.loads((run / "stage1.json").read_text())["settings"].get("init") if kind == "stage1" else None
    if init:  # a warm-started run: record the run it started from as well
        record["init"] = _init_record(Path(init), init_command, init_note)
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if metrics is not None or kept:
        numbers = _metrics(kind, json.loads(metrics.read_text())) if metrics is not None else {}
        if kept:
            numbers["ablations"] = kept
        (tmp / "metrics.json").write_text(json.dumps(numbers, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"shipped {run} as {name}: {dest} ({size / 2**20:.1f} MiB)")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    for kind in KINDS:
        s = sub.add_parser(kind)
        s.add_argument("run", type=Path)
        s.add_argument("--command", required=True, help="the command that trained the run (recorded)")
        s.add_argument("--metrics", type=Path, default=None, help="benchmark JSON to record beside the weights")
        s.add_argument("--init-command", default=None, help="stage 1 --init runs: the first phase's command")
        s.add_argument("--init-note", default=None, help="stage 1 --init runs: where the first phase ran (device)")
        s.add_argument("--keep-ablations", default=None, metavar="WHY",
                       help="carry the replaced weights' ablations over, WHY appended to each note "
                            "(e.g. 'measured on the previous stage-1 weights')")
    m = sub.add_parser("metrics")
    m.add_argument("which", choices=["stage1", "stage2"])
    m.add_argument("bench", type=Path)
    a = sub.add_parser("ablation")
    a.add_argument("which", choices=["stage1", "stage2"])
    a.add_argument("name", help="levels | table7 | lora-lr | nq: the key (and HTML id) the page shows it under")
    a.add_argument("bench", type=Path, help="the benchmark's --json output: {variant: {scene_accuracy, ...}}")
    a.add_argument("--note", required=True, help="how it was measured (budget, threads, lr, test scenes)")
    args = p.parse_args(argv)
    if args.kind == "ablation":
        add_ablation(SHIPPED[f"shapes-{args.which}"][0], args.name, json.loads(args.bench.read_text()), args.note)
    elif args.kind == "metrics":  # same weights, new numbers: the ablations recorded beside them stay
        dest = SHIPPED[f"shapes-{args.which}"][0]
        path, old = dest / "metrics.json", _read_metrics(dest)
        metrics = _metrics(args.which, json.loads(args.bench.read_text()))
        if "ablations" in old:
            metrics["ablations"] = old["ablations"]
        atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {path}")
    else:
        ship(args.kind, args.run, args.command, args.metrics, args.init_command, args.init_note, args.keep_ablations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
