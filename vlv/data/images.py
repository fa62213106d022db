"""Reading a user's image, and the pixel conventions every reader shares.

Any file PIL reads becomes upright 8-bit RGB (:func:`open_image`); training data is its centre square, resized
bicubic, as uint8 (:func:`square`), or cropped as the official code crops (:func:`official_crop`), a :class:`Crop`
naming which; the VAE sees float tensors in [-1, 1] (:func:`to_tensor`), the encoder its own transform's pixels
(:mod:`vlv.data.transforms`).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlv.errors import BadImage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What a broken image raises while PIL opens or decodes it (truncated files, bad streams, missing files).
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


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


def square(im: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): PIL resize (bicubic) of the centre square crop."""
    im = to_rgb(im)
    w, h = im.size
    if w != h:
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def official_crop(im: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3) as the official code crops (``transforms.Resize(size)`` then
    ``transforms.CenterCrop(size)`` of torchvision on a PIL image, its stage-1 and captioning transform): the
    shorter side resized to ``size`` by PIL bilinear, the longer to ``int(size * long / short)`` (no resize when
    the shorter side is ``size`` already), then the centre square at offsets rounded half to even (Python's
    ``round``), where :func:`square` floors them."""
    im = to_rgb(im)
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_w, new_h = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    if (new_w, new_h) != (size, size):
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class Crop:
    """How a decoded image becomes the uint8 square a model reads: ``vlv`` (:func:`square`) or ``official``
    (:func:`official_crop`), at ``size`` px. A value, so DataLoader workers can apply it."""

    size: int
    kind: str = "vlv"

    def __post_init__(self) -> None:
        if self.kind not in CROPS:
            raise ValueError(f"crop kind must be one of {', '.join(CROPS)}, got {self.kind!r}")

    def __call__(self, im: Image.Image) -> np.ndarray:
        return square(im, self.size) if self.kind == "vlv" else official_crop(im, self.size)


CROPS = ("vlv", "official")


def as_crop(size: int | Crop) -> Crop:
    """A size in px means vlv's centre square crop (what every reader did before crops had kinds)."""
    return size if isinstance(size, Crop) else Crop(int(size))


def load_image(path: Path | Image.Image, size: int) -> np.ndarray:
    """A file or PIL image -> RGB uint8 array (size, size, 3), as :func:`square` makes it."""
    return square(open_image(path), size)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the range SD's VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """float (B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def encoded_format(data: bytes) -> str | None:
    """The file extension of encoded image bytes kept as they are (png, jpg, webp), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


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
