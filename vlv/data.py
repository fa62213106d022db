"""Image-caption folders, and the pixel conventions every reader shares (centre crop + bicubic, [-1, 1]).

A folder holds images and a ``captions.jsonl`` with one row per image:
``{"image": "000000.png", "caption": "...", "scene": {...}}`` (``scene`` only for shapes data); the shapes world
writes one (``vlv.shapes.data.write_shapes``). Training reads folders, tar shards and parquet lazily through
:mod:`vlv.datasets`; :class:`ImageCaptionFolder` holds a small folder in memory (the teacher, evaluation, tests).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from vlv.errors import BadImage, InvalidInput
from vlv.modeling import atomic_save_file

CAPTIONS = "captions.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What a broken image raises while PIL opens or decodes it (truncated files, bad streams, missing files).
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


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


def load_image(path: Path | Image.Image, size: int) -> np.ndarray:
    """A file or PIL image -> RGB uint8 array (size, size, 3): PIL resize (bicubic) of the centre square crop."""
    return _square(open_image(path), size)


def open_image(source: str | Path | bytes | Image.Image, name: str | None = None, check_only: bool = False
               ) -> Image.Image:
    """The one way vlv reads a user's image: decoded whole, upright (EXIF orientation), as 8-bit RGB.

    A file that is empty, truncated or not an image raises :class:`BadImage` naming it (``name``, else the path).
    ``check_only``: just prove it decodes, a JPEG at 1/8 scale (its whole stream is still read), for a check of
    many files before the real work.
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    if name is None and not isinstance(source, bytes):
        name = str(source)
    prefix = f"{name}: " if name else ""  # bytes: the caller names the sample
    if source == b"" or not isinstance(source, bytes) and Path(source).is_file() and Path(source).stat().st_size == 0:
        raise BadImage(f"{prefix}empty file, not an image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if check_only:
                im.draft("RGB", (1, 1))
            im.load()  # decode now: a truncated file fails here, not somewhere in the pipeline
            return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise BadImage(f"{prefix}no such file") from None
    except BAD_IMAGE_ERRORS as e:
        raise BadImage(f"{prefix}not a readable image ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):  # its message names a temp object, not the file
        return "not an image format PIL reads"
    return str(error) or type(error).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white, as transformers' ``convert_to_rgb`` (what
    Florence-2's processor calls) does: the colour under alpha 0 is arbitrary, often black. 16- and 32-bit
    greyscale is scaled to 8 bits, where PIL's own convert would clip it to white."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255  # float images in [0, 1]
        elif im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257  # 16-bit range -> 8-bit
        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _square(im: Image.Image, size: int) -> np.ndarray:
    im = to_rgb(im)
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

    def __init__(self, folder: Path, size: int, limit: int | None = None, progress: bool = False,
                 skip_bad: bool = False):
        """``skip_bad``: drop unreadable images (named in ``self.bad``) instead of raising :class:`BadImage`."""
        self.folder = Path(folder)
        records = read_records(self.folder)[:limit]
        self.size = size
        self.records, images, self.bad = [], [], []
        for r in tqdm(records, desc="loading images", disable=not progress, leave=False):
            try:
                images.append(load_image(self.folder / r.image, size))
            except BadImage:
                if not skip_bad:
                    raise
                self.bad.append(r.image)
                continue
            self.records.append(r)
        if not images:
            raise InvalidInput(f"{self.folder}: none of its {len(records)} images is readable")
        self.images = np.stack(images)  # (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        require_captions(self.records, self.folder)
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
