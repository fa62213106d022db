"""``VLV``: the trained auto-encoder as one Python object, for people who call vlv from code.

    from vlv.api import VLV
    vlv = VLV.from_pretrained()                       # shipped shapes weights: stage 1, teacher, stage 2
    vlv.caption(["scene.png"])                        # image -> z -> T -> psi -> LLM -> text
    vlv.reconstruct([Image.open("scene.png")])        # image -> z -> frozen T2I decoder -> image
    VLV.from_pretrained(enc, dec, cap, device="cuda:1", dtype="bf16")   # or torch.bfloat16

Any stage-1 run dir, Stable Diffusion dir and stage-2 run dir works in place of the shipped names. Captioning
needs no UNet or VAE, so a decoder is loaded only when ``reconstruct`` is first called, on the encoder's device
and in its dtype. Results come back on the CPU (embeddings in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlv.captioner import Captioner
from vlv.data.images import open_image, to_pil
from vlv.data.transforms import ImageTransform
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.inference import caption_images, embed_images, placed, reconstruct_images
from vlv.modeling import placement
from vlv.shipped import resolve_decoder

ImageLike = str | Path | Image.Image


class VLV:
    """Stage-1 encoder + frozen diffusion decoder (reconstruction) + optional stage-2 captioner."""

    def __init__(self, encoder: VLVEncoder, decoder: str | Path | DiffusionDecoder, captioner: Captioner | None = None):
        self.encoder, self._decoder, self.captioner = encoder.eval(), decoder, captioner

    @classmethod
    def from_pretrained(cls, encoder: str | Path = "shapes-stage1", decoder: str | Path = "shapes-teacher",
                        captioner: str | Path | None = "shapes-stage2", device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> VLV:
        """Shipped names or run dirs; ``captioner=None`` for reconstruction only. ``device``: cpu, cuda, cuda:N
        or mps (None: cuda when present, else cpu); ``dtype``: fp32, bf16, fp16 or a torch dtype (None: bf16 on a
        GPU that computes it natively, else fp32). Every model loads straight into them."""
        place = placed(device, dtype)  # checked before anything loads
        resolve_decoder(decoder)  # a bad path fails now, not at the first reconstruct
        return cls(VLVEncoder.from_pretrained(encoder, **place), decoder,
                   Captioner.from_pretrained(captioner, **place).eval() if captioner is not None else None)

    @property
    def decoder(self) -> DiffusionDecoder:
        if not isinstance(self._decoder, DiffusionDecoder):
            device, dtype = placement(self.encoder)
            self._decoder = DiffusionDecoder.from_pretrained(self._decoder, dtype=dtype, device=device)
        return self._decoder

    def _images(self, images: Sequence[ImageLike], transform: ImageTransform) -> np.ndarray:
        """The images cut by an encoder's transform (``crop``): uint8 (B, size, size, 3)."""
        return np.stack([transform.crop(open_image(im if isinstance(im, Image.Image) else Path(im)))
                         for im in images])

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> the caption embeddings z (B, Nq, d_T)."""
        return embed_images(self.encoder, self._images(images, self.encoder.transform))

    @torch.no_grad()
    def caption(self, images: Sequence[ImageLike], num_beams: int | None = None, batch_size: int = 64) -> list[str]:
        """Images -> captions, batched (stage 2)."""
        if self.captioner is None:
            raise ValueError("this VLV has no captioner: load it with from_pretrained(captioner=...)")
        x = self._images(images, self.captioner.encoder.transform)
        return caption_images(self.captioner, x, batch_size=batch_size, num_beams=num_beams)

    @torch.no_grad()
    def reconstruct(self, images: Sequence[ImageLike], sampler: str = "fast", guidance_scale: float = 2.0,
                    steps: int | None = None, seed: int = 0, batch_size: int = 64) -> list[Image.Image]:
        """Images -> z -> the decoder's images from z alone (caption-free; CFG against T(""))."""
        x = self._images(images, self.encoder.transform)
        return to_pil(reconstruct_images(self.encoder, self.decoder, x, sampler=sampler, guidance_scale=guidance_scale,
                                         steps=steps, batch_size=batch_size, seed=seed))
