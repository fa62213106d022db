"""The ``captions.jsonl`` format of an image-caption folder.

A folder holds images and a ``captions.jsonl`` with one row per image:
``{"image": "000000.png", "caption": "...", "scene": {...}}`` (``scene`` only for shapes data); the shapes world
writes one (``vlv.shapes.data.write_shapes``). A folder of images without it has records with no caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlv.data.images import IMAGE_EXTENSIONS
from vlv.errors import InvalidInput

CAPTIONS = "captions.jsonl"


@dataclass
class Record:
    image: str
    caption: str | None = None
    scene: dict | None = None


def read_records(folder: Path) -> list[Record]:
    """Rows of ``captions.jsonl``; a folder of images without it yields records with no caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such data folder: {folder}")
    index = folder / CAPTIONS
    if not index.exists():
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not names:
            raise FileNotFoundError(f"{folder} has neither {CAPTIONS} nor images")
        return [Record(image=n) for n in names]
    records = []
    with index.open(encoding="utf-8", errors="replace") as f:  # a binary file then fails as bad JSON, by line
        for line_no, line in enumerate(f, 1):
            if line.strip():
                records.append(_record(line, f"{index}:{line_no}"))
    if not records:
        raise InvalidInput(f"{index} has no rows")
    return records


def _record(line: str, where: str) -> Record:
    """One row of captions.jsonl, its types checked: a row that would fail later fails here, naming its line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where}: not a JSON row ({e})") from None
    if not isinstance(row, dict):
        raise InvalidInput(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "image" not in row:
        raise InvalidInput(f"{where}: the row has no \"image\"")
    types = {"image": (str,), "caption": (str, type(None)), "scene": (dict, type(None))}
    for key, allowed in types.items():
        if not isinstance(row.get(key), allowed):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "dict": "an object"}[t.__name__]
                               for t in allowed)
            raise InvalidInput(f"{where}: \"{key}\" must be {want}, got {json.dumps(row[key])[:40]}")
    if not row["image"].strip():
        raise InvalidInput(f"{where}: \"image\" is empty")
    return Record(image=row["image"], caption=row.get("caption"), scene=row.get("scene"))


def read_captions(folder: str | Path, limit: int | None = None) -> list[str]:
    """The captions of an image-caption folder, without loading its images."""
    records = read_records(Path(folder))[:limit]
    require_captions(records, folder)
    return [r.caption for r in records]  # type: ignore[misc]


def require_captions(records: list[Record], folder: str | Path) -> None:
    missing = [r.image for r in records if r.caption is None]
    if missing:
        where = f"no {CAPTIONS}" if not (Path(folder) / CAPTIONS).exists() else f"first {missing[0]}"
        raise InvalidInput(f"{folder}: {len(missing)} of {len(records)} images have no caption ({where}); "
                           "this needs an image-caption folder")
