"""What a run shows while it trains: the samples of an evaluation (images, captions) written into the run dir, and
loss, lr, throughput, evaluations and samples sent to experiment trackers through accelerate's own
(``Accelerator(log_with=...)``, ``--report-to tensorboard``: files in RUN/logs).

An evaluator returns its scalars as floats and its samples as :class:`ImageGrid` / :class:`Texts` values in the
same dict; the loop keeps the floats in the run's history and hands the samples to :func:`record_samples`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available
from PIL import Image

from vlv.errors import InvalidInput
from vlv.modeling import atomic_save_png, atomic_write_text

LOGS = "logs"  # RUN/logs/<task>/: the trackers' files (tensorboard --logdir RUN/logs)
SAMPLES = "val"  # RUN/val/<key>/step-000100.png (or .txt): each evaluation's samples
EVAL_PREFIX = "eval/"  # evaluation metrics in the trackers, beside train/loss, train/lr, train/<unit>_per_s


@dataclass(frozen=True)
class ImageGrid:
    """Images an evaluation shows, as one uint8 grid (H, W, 3)."""

    pixels: np.ndarray


@dataclass(frozen=True)
class Texts:
    """Texts an evaluation shows (sample captions), one a line."""

    lines: tuple[str, ...]


def image_grid(rows: list[np.ndarray]) -> ImageGrid:
    """Rows of uint8 images (N, H, W, 3), all of one size -> one grid, a row each (originals over
    reconstructions)."""
    return ImageGrid(np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0))


def check_report_to(report_to: str) -> None:
    """Refuse a tracker that is not installed, before anything loads (accelerate would drop it silently)."""
    if report_to == "tensorboard" and not is_tensorboard_available():
        raise InvalidInput("--report-to tensorboard: tensorboard is not installed (pip install 'vlv[tracking]', "
                           "or pass --report-to none)")


def tracking_kwargs(report_to: str, run: Path | None) -> dict[str, Any]:
    """The Accelerator's keywords for ``report_to``: its tracker, writing under RUN/logs."""
    if report_to == "none":
        return {}
    check_report_to(report_to)
    if run is None:
        raise ValueError(f"report_to {report_to} writes into the run dir: pass it to make_accelerator")
    return {"log_with": [report_to],
            "project_config": ProjectConfiguration(project_dir=str(run), logging_dir=str(Path(run) / LOGS))}


def hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as trackers store hyperparameters: numbers, strings, bools and None, nothing nested."""
    return {k: v if v is None or isinstance(v, bool | int | float | str) else str(v) for k, v in config.items()}


def split(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, ImageGrid | Texts]]:
    """An evaluation's (scalars, samples)."""
    samples = {k: v for k, v in metrics.items() if isinstance(v, ImageGrid | Texts)}
    return {k: v for k, v in metrics.items() if k not in samples}, samples


def sample_path(run: Path, key: str, step: int, sample: ImageGrid | Texts) -> Path:
    """Where the samples ``key`` of the evaluation at ``step`` are written."""
    suffix = ".png" if isinstance(sample, ImageGrid) else ".txt"
    return Path(run) / SAMPLES / key / f"step-{step:06d}{suffix}"


def record_samples(accelerator: Accelerator, run: Path, step: int, samples: Mapping[str, ImageGrid | Texts]
                   ) -> list[Path]:
    """On the main process: each sample into the run dir (atomically) and to every tracker; the paths written."""
    if not accelerator.is_main_process:
        return []
    paths = []
    for key, sample in samples.items():
        path = sample_path(run, key, step, sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(sample, ImageGrid):
            atomic_save_png(Image.fromarray(sample.pixels), path)
        else:
            atomic_write_text(path, "".join(line + "\n" for line in sample.lines))
        paths.append(path)
        for tracker in accelerator.trackers:
            _send(tracker, EVAL_PREFIX + key, sample, step)
    return paths


def _send(tracker, key: str, sample: ImageGrid | Texts, step: int) -> None:
    if isinstance(sample, Texts):
        tracker.log({key: "\n\n".join(sample.lines)}, step=step)  # markdown: a paragraph a line
    elif tracker.name == "tensorboard":  # SummaryWriter.add_images takes a batch and its layout
        tracker.log_images({key: sample.pixels[None]}, step=step, dataformats="NHWC")
    elif hasattr(tracker, "log_images"):  # the other trackers take a list of images
        tracker.log_images({key: [sample.pixels]}, step=step)


def finish(accelerator: Accelerator) -> None:
    """Close the trackers (files flushed) and forget them, so the Accelerator could start them again. Not
    ``end_training``: that also destroys the process group, which the final weights' collective write needs."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
    accelerator.trackers.clear()
