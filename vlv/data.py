"""Image-caption folders, and the pixel conventions every reader shares (centre crop + bicubic, [-1, 1]).

A folder holds images and a ``captions.jsonl`` with one row per image:
``{"image": "000000.png", "caption": "...", "scene": {...}}`` (``scene`` only for shapes data); the shapes world
writes one (``vlv.shapes.data.write_shapes``). Training reads folders, tar shards and parquet lazily through
:mod:`vlv.datasets`; :class:`ImageCaptionFolder` holds a small folder in memory (the teacher, evaluation, tests).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from vlv.modeling import atomic_save_file

CAPTIONS = "captions.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
    with index.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.append(Record(image=row["image"], caption=row.get("caption"), scene=row.get("scene")))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}:{line_no}: bad row ({e})") from None
    return records


def read_captions(folder: str | Path, limit: int | None = None) -> list[str]:
    """The captions of an image-caption folder, without loading its images."""
    records = read_records(Path(folder))[:limit]
    if any(r.caption is None for r in records):
        raise ValueError(f"{folder} has images without captions")
    return [r.caption for r in records]  # type: ignore[misc]


def load_image(path: Path | Image.Image, size: int) -> np.ndarray:
    """A file or PIL image -> RGB uint8 array (size, size, 3): PIL resize (bicubic) of the centre square crop."""
    if isinstance(path, Image.Image):
        return _square(path, size)
    with Image.open(path) as im:
        return _square(im, size)


def _square(im: Image.Image, size: int) -> np.ndarray:
    im = im.convert("RGB")
    w, h = im.size
    if w != h:
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the range SD's VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """float (B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class ImageCaptionFolder:
    """An image-caption folder held in memory as uint8 (small data: the shapes world, test sets)."""

    def __init__(self, folder: Path, size: int, limit: int | None = None, progress: bool = False):
        self.folder = Path(folder)
        self.records = read_records(self.folder)[:limit]
        self.size = size
        self.images = np.stack(
            [
                load_image(self.folder / r.image, size)
                for r in tqdm(self.records, desc="loading images", disable=not progress, leave=False)
            ]
        )  # (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        if any(r.caption is None for r in self.records):
            raise ValueError(f"{self.folder} has images without captions")
        return [r.caption for r in self.records]  # type: ignore[misc]

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
        """Index batches over one epoch, shuffled when rng is given; the last batch may be short."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def cache_latents(vae: torch.nn.Module, data: ImageCaptionFolder, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """The frozen VAE's posterior (mean, std) per image, unscaled: the one VAE pass training on ``data`` needs.

    Why the posterior and not one latent: each step then draws its own sample ``mean + std * eps``, exactly as
    encoding the image online would, at none of the VAE's cost. Used by the teacher's UNet phase and stage 1.
    """
    means, stds = [], []
    for idx in data.batches(batch_size):
        dist = vae.encode(to_tensor(data.images[idx]).to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return {"mean": torch.cat(means), "std": torch.cat(stds)}  # (N, C, h, w) each


def cached_latents(vae: torch.nn.Module, data: ImageCaptionFolder, path: Path,
                   batch_size: int = 128) -> dict[str, torch.Tensor]:
    """:func:`cache_latents` computed once per file (fp16, written atomically: a killed run recomputes it
    whole, never reads a torn file), then read back; later runs and resumes only read it."""
    if not path.exists():
        atomic_save_file({k: v.half().contiguous() for k, v in cache_latents(vae, data, batch_size).items()}, path)
    return load_file(path)


def list_images(paths: list[Path]) -> list[Path]:
    """Expand files and folders into a sorted list of image files; errors name the bad path."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not found:
        raise FileNotFoundError("no images found in " + ", ".join(map(str, paths)))
    return found
