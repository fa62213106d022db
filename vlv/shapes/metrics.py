"""Exact measures of the shapes world on VLV's outputs, and the evaluators the training tasks are given.

Images are read back by ``world.detect``, captions by ``world.parse_caption``; both are scored against the
true scenes with ``world.score`` (scene accuracy, object F1, attribute accuracy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from vlv.captioner import Captioner
from vlv.checks import require_dirs
from vlv.data.datasets import InMemory
from vlv.data.images import open_image, to_pil, to_tensor
from vlv.data.records import read_records, require_captions
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import Sampler, sample
from vlv.encoder import VLVEncoder
from vlv.inference import caption_images, reconstruct_images
from vlv.shapes import world


def truths(data: InMemory) -> list[set]:
    return [world.parse_caption(c) for c in data.captions]


def image_scores(images: list, data: InMemory) -> world.Scores:
    """The detector on images vs the true captions of ``data``, row by row."""
    return world.score([world.detect(im) for im in images], truths(data))


@torch.no_grad()
def vae_accuracy(vae: AutoencoderKL, data: InMemory, batch_size: int = 256) -> float:
    """Scene accuracy of the detector on VAE reconstructions (posterior mode) of a captioned folder."""
    preds = []
    for idx in data.batches(batch_size):
        x = to_tensor(data.images[idx]).to(vae.device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        preds += [world.detect(im) for im in to_pil(recon)]
    return world.score(preds, truths(data)).scene_accuracy


def sample_accuracy(pipe, captions: list[str], draw=sample, **kwargs) -> world.Scores:
    """Text -> image -> detector vs the captions themselves: the teacher's own accuracy (its ceiling). ``draw`` is
    the layout's sampler (``vlv.diffusion.sample``; an SD3-layout teacher's draws through its own pipeline)."""
    images = draw(pipe, captions, **kwargs)
    return world.score([world.detect(im) for im in images], [world.parse_caption(c) for c in captions])


def reconstruction_scores(encoder: VLVEncoder, decoder: DiffusionDecoder, data: InMemory,
                          **kwargs) -> world.Scores:
    """Image -> z -> decoder -> detector vs the true captions (stage 1)."""
    recon = reconstruct_images(encoder, decoder, data.images, **kwargs)
    return image_scores(to_pil(recon), data)


def caption_scores(captioner: Captioner, data: InMemory, num_beams: int | None = None) -> dict[str, float]:
    """Exact captions, grammar, and the caption reader's scene accuracy / object F1 vs the truth (stage 2)."""
    preds = caption_images(captioner, data.images, num_beams=num_beams)
    s = world.score([world.parse_caption(p) for p in preds], truths(data))
    return {"caption_exact": float(np.mean([p == t for p, t in zip(preds, data.captions, strict=True)])),
            "well_formed": float(np.mean([world.is_well_formed(p) for p in preds])),
            "scene_accuracy": s.scene_accuracy, "object_f1": s.object_f1}


# ------------------------------------------------------------------------------ evaluators for the tasks
def check_val(val: Path, n: int) -> None:
    """A held-out folder an evaluator reads later: captioned, its first ``n`` images decode (checked now, before a
    training run loads anything)."""
    require_dirs(val)
    records = read_records(Path(val))
    require_captions(records, val)
    for r in records[:n]:
        open_image(Path(val) / r.image)


def stage1_evaluator(val: Path, n: int, sampler: Sampler = "fast"):
    """``evaluator(encoder, decoder)`` for ``train_stage1``: reconstruction accuracy on ``n`` val scenes."""
    check_val(val, n)
    cache: dict[int, InMemory] = {}

    def evaluate(encoder: VLVEncoder, decoder: DiffusionDecoder) -> dict[str, float]:
        size = decoder.image_size
        if size not in cache:  # read once, at the decoder's resolution
            cache[size] = InMemory.of(Path(val), size, limit=n)
        s = reconstruction_scores(encoder, decoder, cache[size], sampler=sampler)
        return {"recon_scene_accuracy": s.scene_accuracy, "recon_object_f1": s.object_f1}

    return evaluate


def stage2_evaluator(val: Path, n: int, num_beams: int = 1):
    """``evaluator(captioner)`` for ``train_stage2``: caption accuracy on ``n`` val scenes (greedy: cheaper)."""
    check_val(val, n)
    cache: dict[int, InMemory] = {}

    def evaluate(captioner: Captioner) -> dict[str, float]:
        size = captioner.encoder.config.image_size
        if size not in cache:  # read once, at the encoder's resolution
            cache[size] = InMemory.of(Path(val), size, limit=n)
        return caption_scores(captioner, cache[size], num_beams=num_beams)

    return evaluate


def lm_judge(samples: list[str]) -> dict[str, float]:
    """For ``train_lm``: how many sampled texts follow the caption grammar."""
    return {"sample_well_formed": float(np.mean([world.is_well_formed(s) for s in samples]))}
