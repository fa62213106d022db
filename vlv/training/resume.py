"""What a training command checks before it loads anything: a started run dir resumes with its own settings."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlv.checks import read_json
from vlv.errors import InvalidInput
from vlv.training.checkpoint import has_checkpoint
from vlv.training.config import TrainConfig
from vlv.training.tracking import check_report_to

# Settings a resumed run may change: how it reports, checkpoints, stops and reads data, not what it computes.
FREE_ON_RESUME = frozenset({"progress", "max_minutes", "stop_after", "checkpoint_minutes", "checkpoint_every",
                            "log_every", "eval_every", "resume", "num_workers", "on_bad_image",
                            "timeout_minutes", "export_every", "report_to"})


def changed_settings(saved: dict[str, dict], requested: dict[str, dict]) -> list[str]:
    """``section.field`` of every setting that differs between a run's record and a new request."""
    out = []
    for section, fields in requested.items():
        old = saved.get(section, {})
        free = FREE_ON_RESUME | ({"steps"} if fields.get("budget_minutes") else set())  # a budget plans its steps
        out += [f"{section}.{k}" for k, v in fields.items() if k not in free and k in old and _json(old[k]) != _json(v)]
    return out


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists alike, as the record stores them


def check_request(run: Path, record_file: str, requested: dict[str, dict], cfg: TrainConfig) -> None:
    """What a training command checks before it loads anything: the launch fits the sharding, the tracker asked
    for is installed, and a started run dir is resumed with its own settings."""
    check_report_to(cfg.report_to)
    if cfg.sharding != "ddp" and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise InvalidInput(f"sharding {cfg.sharding} (the recipe's or --sharding) needs several processes: launch "
                           "with torchrun or accelerate launch, or pass --sharding ddp")
    check_resume(run, record_file, requested, cfg.resume == "override")


def check_resume(run: Path, record_file: str, requested: dict[str, dict], override: bool = False,
                 checkpoint_dir: Path | None = None, upgrade: Callable[[dict], dict] | None = None) -> None:
    """A run dir with a checkpoint resumes only with the settings its record holds (unless ``resume=override``):
    a changed lr, batch, seed or recipe would otherwise go on silently from weights trained another way.
    ``upgrade`` reads a record written in an older layout as the current one, so its fields are still compared."""
    run = Path(run)
    record = run / record_file
    if override or not has_checkpoint(checkpoint_dir or run) or not record.is_file():
        return
    saved = read_json(record)
    diff = changed_settings(upgrade(saved) if upgrade else saved, requested)
    if diff:
        raise InvalidInput(f"{run} was started with other settings ({', '.join(diff)}): run its command again to "
                           f"resume, use another --out, or pass --resume override")
