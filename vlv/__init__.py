"""vlv: the Vision-Language-Vision auto-encoder (Zhang et al., arXiv 2507.07104).

The public models and their configs, as diffusers and transformers export theirs::

    from vlv import VLVEncoder, DiffusionDecoder, Captioner

Names load lazily, so ``vlv --help`` does not import torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from vlv.version import __version__ as __version__

# transformers notes, once per image-processor class, that torchvision is absent and it falls back to PIL: vlv
# preprocesses with PIL + numpy and never uses either. Only that record is dropped; every other transformers
# warning (weights not initialised, ...) still shows.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

_EXPORTS = {
    "VLVEncoder": "vlv.encoder", "EncoderConfig": "vlv.config",
    "DiffusionDecoder": "vlv.decoder",
    "Captioner": "vlv.captioner", "CaptionerConfig": "vlv.config",
    "TrainConfig": "vlv.training.config",
    "VLV": "vlv.api",
}
__all__ = ["VLV", "Captioner", "CaptionerConfig", "DiffusionDecoder", "EncoderConfig", "TrainConfig", "VLVEncoder",
           "__version__"]

if TYPE_CHECKING:
    from vlv.api import VLV
    from vlv.captioner import Captioner
    from vlv.config import CaptionerConfig, EncoderConfig
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder
    from vlv.training.config import TrainConfig


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlv' has no attribute {name!r}")
