"""Shapes scenes written as an image-caption folder (:mod:`vlv.data.records`' format), the input of every command."""

from __future__ import annotations

import json
from pathlib import Path

from vlv.data.records import CAPTIONS
from vlv.errors import InvalidInput
from vlv.modeling import atomic_write_text, write_json
from vlv.progress import tqdm
from vlv.shapes import world


def write_shapes(out: Path, n: int, seed: int = 0, split: world.SplitName = "train", progress: bool = True) -> Path:
    """Render n scenes of a split into ``out`` (PNGs + captions.jsonl); deterministic from (seed, split, n)."""
    if n <= 0:
        raise InvalidInput(f"--n must be positive, got {n}")
    if split not in world.SPLITS:
        raise InvalidInput(f"unknown split {split!r}; choose from {', '.join(world.SPLITS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n - 1)))
    rows = []
    for i in tqdm(range(n), desc=f"shapes {split}", unit="img", disable=not progress):
        scene = world.scene_at(seed, split, i)
        name = f"{i:0{width}d}.png"
        world.render(scene).save(out / name)
        rows.append({"image": name, "caption": world.caption(scene), "scene": scene.to_json()})
    atomic_write_text(out / CAPTIONS, "".join(json.dumps(r) + "\n" for r in rows))
    write_json(out / "dataset.json", {"world": "shapes-v1", "n": n, "seed": seed, "split": split})
    return out
