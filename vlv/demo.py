"""``vlv demo``: the main job on the embedded default (the shapes world).

For now it makes the data and a contact sheet; the teacher, stage 1 and stage 2 join as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlv.data import atomic_write_text, write_shapes
from vlv.report import save_contact_sheet

PRESETS = {"default": {"train": 10_000, "test": 500}, "quick": {"train": 256, "test": 64}}


def run_demo(out: Path, preset: str = "default", minutes: float | None = None) -> dict:
    sizes = PRESETS[preset]
    timings: dict[str, float] = {}
    for split, n in (("train", sizes["train"]), ("test", sizes["test"])):
        folder = out / "data" / split
        done = folder / "dataset.json"
        if done.exists() and json.loads(done.read_text()).get("n") == n:
            continue  # finished stages are skipped on a re-run
        t0 = time.perf_counter()
        write_shapes(folder, n=n, seed=0, split=split)
        timings[f"data_{split}_s"] = round(time.perf_counter() - t0, 2)
    sheet = save_contact_sheet(out / "data" / "test", out / "test_sheet.png")
    metrics = {"preset": preset, "timings": timings, "sheet": sheet.name}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"demo finished: {out}/test_sheet.png, {out}/metrics.json")
    return metrics
