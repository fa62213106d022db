"""An encoder's image transform: a user's image -> the pixel_values its vision tower reads (open_clip's
``create_model_and_transforms`` idea: the model says how it wants its images, and every caller asks it).

Two stages, so the costly PIL work runs where images are decoded:

- crop (:class:`vlv.data.images.Crop`): a decoded image -> a uint8 square at ``crop_size``, in DataLoader workers
  (training, the inference commands) or at once (:meth:`ImageTransform.__call__`, the API);
- pixels (:meth:`ImageTransform.pixels`): a batch of those squares -> normalised float (B, 3, S, S).

Kinds (``EncoderConfig.transform``):

- ``vlv``: centre square with floored offsets, PIL bicubic to ``crop_size``; then, as a tensor in [-1, 1] (the
  VAE's range), torch bicubic (antialiased) to S when the sizes differ, and the mean / std normalisation. The path
  vlv's training has always taken, so the pixels of its encoders are the bits they trained on.
- ``official``: torchvision's ``Resize(crop_size)`` + ``CenterCrop(crop_size)``, as the official code crops
  (stage 1 and ``Caption_inference.py``, ``--image_size`` 384); then Florence-2's processor (CLIPImageProcessor):
  PIL bicubic to S, rescale by 1/255, normalise (:func:`pixel_values`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlv.config import IMAGENET_MEAN, IMAGENET_STD
from vlv.data.images import Crop, open_image, to_tensor


def pixel_values(images: Sequence[Image.Image], size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) as Florence-2's processor makes them: PIL bicubic resize, /255, normalise.

    ``x / 255`` in float32 is bitwise the processor's ``float32(float64(x) * (1 / 255))`` for every uint8 x.
    """
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
              for im in images]
    x = np.stack(arrays) / 255.0  # (B, S, S, 3) in [0, 1]
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def vae_range_pixels(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B, 3, S, S): to [0, 1], torch bicubic (antialiased) when H, W != S,
    normalised. The second stage of the ``vlv`` transform, on whatever device the images are."""
    x = (images + 1) / 2  # (B, 3, H, W) in [0, 1]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return (x - x.new_tensor(mean)[:, None, None]) / x.new_tensor(std)[:, None, None]  # (B, 3, S, S)


@dataclass(frozen=True)
class ImageTransform:
    """One encoder's transform (see the module docstring); ``VLVEncoder.transform`` builds it from the config."""

    kind: str
    crop_size: int
    size: int  # S, the vision tower's input side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def crop(self) -> Crop:
        """The first stage, as a value the data loaders take in place of a size."""
        return Crop(self.crop_size, self.kind)

    def at(self, crop_size: int) -> ImageTransform:
        """The same transform cutting images to ``crop_size`` (stage 1's data resolution)."""
        return replace(self, crop_size=crop_size)

    def pixels(self, images: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 squares (B, H, W, 3), as :attr:`crop` cuts them (any side: the resize to S follows) ->
        pixel_values (B, 3, S, S) float32 on ``device``."""
        arrays = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {arrays.dtype} {arrays.shape}")
        if self.kind == "vlv":
            return vae_range_pixels(to_tensor(arrays).to(device), self.size, self.mean, self.std)
        return pixel_values([Image.fromarray(a) for a in arrays], self.size, self.mean, self.std).to(device)

    def __call__(self, images: Sequence[Image.Image | str | Path], device: torch.device | str | None = None
                 ) -> torch.Tensor:
        """Images (PIL, or files read by :func:`vlv.data.images.open_image`) -> pixel_values (B, 3, S, S)."""
        crop = self.crop
        return self.pixels(np.stack([crop(open_image(im)) for im in images]), device)
