"""Inference with trained VLV parts, batched: images -> z (embed), z -> images (reconstruct), images -> captions.

Images are tensors (N, 3, H, W) in [-1, 1] (``vlv.data.images.to_tensor``); each function moves its batches to the
model's device and returns CPU-side results in input order. The models load alone from their run dirs or
shipped names: ``VLVEncoder.from_pretrained``, ``DiffusionDecoder.from_pretrained``,
``Captioner.from_pretrained``.
"""

from __future__ import annotations

import torch

from vlv.captioner import Captioner
from vlv.decoder import DiffusionDecoder, compose
from vlv.diffusion import Sampler
from vlv.encoder import VLVEncoder


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def embed_images(encoder: VLVEncoder, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> caption embeddings z (N, Nq, d_T)."""
    device = _device(encoder)
    return torch.cat([encoder(encoder.normalize(images[s : s + batch_size].to(device))).cpu()
                      for s in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstruct_images(encoder: VLVEncoder, decoder: DiffusionDecoder, images: torch.Tensor,
                       sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                       batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> reconstructions (N, 3, H', W') in [-1, 1], caption-free, batched.

    Each batch is seeded by its offset, so the result does not depend on ``batch_size``'s split of the work.
    """
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(decoder.vae.device)
        z = encoder(encoder.normalize(x))  # (B, Nq, d_T)
        gen = torch.Generator(x.device).manual_seed(seed + start)
        out.append(decoder.reconstruct(z, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                                       generator=gen) * 2 - 1)
    return torch.cat(out)


@torch.no_grad()
def compose_images(encoder: VLVEncoder, decoder: DiffusionDecoder, a: torch.Tensor, b: torch.Tensor, k: int,
                   sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Paper Fig. 6: images a and b (n, 3, H, W) -> one image each from the first k embeddings of both."""
    device = decoder.vae.device
    z_a, z_b = encoder(encoder.normalize(a.to(device))), encoder(encoder.normalize(b.to(device)))  # (n, Nq, d_T)
    gen = torch.Generator().manual_seed(seed)
    return decoder.reconstruct(compose(z_a, z_b, k), guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                               generator=gen) * 2 - 1  # (n, 3, H', W') in [-1, 1]


@torch.no_grad()
def caption_images(captioner: Captioner, images: torch.Tensor, batch_size: int = 64,
                   num_beams: int | None = None) -> list[str]:
    """Images (N, 3, H, W) in [-1, 1] -> N captions, batched through the encoder and ``generate``."""
    device = captioner.psi[0].weight.device
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        pixel_values = captioner.encoder.normalize(images[start : start + batch_size].to(device))  # (B, 3, S, S)
        out += captioner.generate(pixel_values=pixel_values, num_beams=num_beams)
    return out
