"""Inference with trained VLV parts, batched: images -> z (embed), z -> images (reconstruct), images -> captions.

Images are tensors (N, 3, H, W) in [-1, 1] (``vlv.data.images.to_tensor``); each function moves whole batches
to the model's device and dtype (bf16 comes from the weights themselves: the models load in the chosen dtype, so
no autocast is needed and the memory is halved) and returns fp32 CPU results in input order. The ``*_files``
jobs (what ``vlv caption``, ``reconstruct``, ``embed`` and ``compose`` run) check every input, the device and
the precision included, before a model loads, then write their outputs atomically. The models load alone from
their run dirs or shipped names, straight into the chosen device and dtype: ``VLVEncoder.from_pretrained``,
``DiffusionDecoder.from_pretrained``, ``Captioner.from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlv.captioner import POSTPROCESSORS, Captioner
from vlv.checks import read_json, text_length
from vlv.data.datasets import ImageFiles
from vlv.data.images import list_images, load_image, open_image, to_pil, to_tensor
from vlv.data.loader import row_loader
from vlv.decoder import DiffusionDecoder, compose
from vlv.diffusion import Sampler
from vlv.encoder import CONFIG_FILE as ENCODER_FILE
from vlv.encoder import VLVEncoder
from vlv.errors import BadImage, InvalidInput
from vlv.modeling import (
    atomic_save_file,
    atomic_save_png,
    atomic_write_text,
    in_run_dir,
    placement,
    resolve_device,
    resolve_dtype,
)
from vlv.shipped import resolve_decoder, resolve_encoder, resolve_stage2
from vlv.text_encoder import clip_from_embeds, load_text_encoder


@torch.no_grad()
def _embed(encoder: VLVEncoder, images: torch.Tensor) -> torch.Tensor:
    """One batch of images in [-1, 1] -> z on the encoder's device, in its dtype. Pixels are normalised in fp32
    on that device, then cast: bf16 holds [-1, 1] to only ~3 digits."""
    device, dtype = placement(encoder)
    return encoder(encoder.normalize(images.to(device)).to(dtype))  # (B, Nq, d_T)


def _cpu(x: torch.Tensor) -> torch.Tensor:
    """Results leave the device as fp32 on the CPU, whatever the model computed in."""
    return x.float().cpu()


@torch.no_grad()
def embed_images(encoder: VLVEncoder, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> caption embeddings z (N, Nq, d_T), fp32 on the CPU."""
    return torch.cat([_cpu(_embed(encoder, images[s : s + batch_size])) for s in range(0, len(images), batch_size)])


@torch.no_grad()
def text_embeds_of(text_encoder: torch.nn.Module, z: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """T(z) (N, Nq, d_T) of caption embeddings z (N, Nq, d_T), through T on its device, fp32 on the CPU."""
    device, dtype = placement(text_encoder)
    return torch.cat([_cpu(clip_from_embeds(text_encoder, z[s : s + batch_size].to(device, dtype)))
                      for s in range(0, len(z), batch_size)])


@torch.no_grad()
def reconstruct_images(encoder: VLVEncoder, decoder: DiffusionDecoder, images: torch.Tensor,
                       sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                       batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> reconstructions (N, 3, H', W') in [-1, 1], caption-free, batched; fp32
    on the CPU.

    Each batch is seeded by its offset, so the result does not depend on ``batch_size``'s split of the work. The
    noise is drawn on the CPU whatever the device, so a GPU run starts from the same latents as a CPU run.
    """
    device, dtype = placement(decoder.unet)
    out = []
    for start in range(0, len(images), batch_size):
        z = _embed(encoder, images[start : start + batch_size]).to(device, dtype)  # (B, Nq, d_T)
        gen = torch.Generator().manual_seed(seed + start)
        out.append(_cpu(decoder.reconstruct(z, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                                            generator=gen)) * 2 - 1)
    return torch.cat(out)


@torch.no_grad()
def compose_images(encoder: VLVEncoder, decoder: DiffusionDecoder, a: torch.Tensor, b: torch.Tensor, k: int,
                   sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Paper Fig. 6: images a and b (n, 3, H, W) -> one image each from the first k embeddings of both, fp32 on
    the CPU."""
    device, dtype = placement(decoder.unet)
    z_a, z_b = (_embed(encoder, x).to(device, dtype) for x in (a, b))  # (n, Nq, d_T) each
    gen = torch.Generator().manual_seed(seed)
    return _cpu(decoder.reconstruct(compose(z_a, z_b, k), guidance_scale=guidance_scale, steps=steps,
                                    sampler=sampler, generator=gen)) * 2 - 1  # (n, 3, H', W') in [-1, 1]


@torch.no_grad()
def caption_images(captioner: Captioner, images: torch.Tensor, batch_size: int = 64, num_beams: int | None = None,
                   max_new_tokens: int | None = None, postprocess: str | None = None) -> list[str]:
    """Images (N, 3, H, W) in [-1, 1] -> N captions, batched through the encoder and ``generate`` on the
    captioner's device, in its dtype (options left None are the run's own)."""
    device, dtype = placement(captioner.psi)
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        pixel_values = captioner.encoder.normalize(x).to(dtype)  # (B, 3, S, S), normalised in fp32
        out += captioner.generate(pixel_values=pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  postprocess_rule=postprocess)
    return out


def placed(device: str | torch.device | None, precision: str | torch.dtype | None) -> dict[str, Any]:
    """``device`` and ``dtype`` keywords for the models' ``from_pretrained``, checked before anything loads (None:
    cuda when present, else cpu; the device's default precision, ``vlv.modeling.default_precision``)."""
    dev = resolve_device(device)
    return {"device": dev, "dtype": resolve_dtype(precision, dev)}


# ------------------------------------------------------------------------------ jobs on image files
def check_images(paths: list[Path], skip_bad: bool = False) -> list[Path]:
    """The image files of ``paths`` (files and folders), each decoded once now, so a bad one stops the job before
    any model loads (or, with ``skip_bad``, is left out and counted)."""
    found, bad = list_images(paths), []
    for p in found:
        try:
            open_image(p, check_only=True)
        except BadImage as e:
            if not skip_bad:
                raise BadImage(f"{e} (--skip-bad skips unreadable images)") from None
            bad.append(p)
    skipped = set(bad)
    good = [p for p in found if p not in skipped]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) of {len(found)} (first {bad[0]})")
    if not good:
        raise InvalidInput(f"none of the {len(found)} image(s) is readable")
    return good


def encoder_config_of(encoder: str | Path) -> dict[str, Any]:
    """A stage-1 run's encoder config, read from its JSON (no model built), its weights files checked."""
    return read_json(resolve_encoder(encoder) / ENCODER_FILE)["config"]


def check_captioner(model: str | Path) -> None:
    """A stage-2 run and the parts its config names (T's decoder dir, the stage-1 encoder), read but not loaded."""
    path = resolve_stage2(model)
    try:
        config = read_json(path / "captioner.json")["config"]
    except KeyError as e:
        raise InvalidInput(f"{path / 'captioner.json'}: not a captioner config (no {e})") from None
    if config.get("text_encoder"):
        resolve_decoder(in_run_dir(path, config["text_encoder"]))
    if config.get("encoder"):
        resolve_encoder(in_run_dir(path, config["encoder"]))


def _batches(paths: list[Path], size: int, batch_size: int, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, images (B, 3, size, size) in [-1, 1]) of the files, streamed through the dataset reader a batch at
    a time (decoded as training decodes them), with a progress bar. The files were checked already: one that has
    gone bad since fails naming it."""
    from tqdm.auto import tqdm

    loader = row_loader(ImageFiles(paths), size, 0, len(paths), batch_size, on_bad_image="fail")
    for start, batch in zip(range(0, len(paths), batch_size), tqdm(loader, desc=desc, unit="batch"), strict=True):
        yield start, to_tensor(batch["images"].numpy())


def caption_files(images: list[Path], out: Path, model: str | Path = "shapes-stage2", batch_size: int = 64,
                  num_beams: int | None = None, max_new_tokens: int | None = None, postprocess: str | None = None,
                  skip_bad: bool = False, device: str | torch.device | None = None,
                  precision: str | torch.dtype | None = None) -> int:
    """Caption image files into ``out`` (captions.jsonl: one ``{"image", "caption"}`` line each); returns the count.
    ``device``/``precision``: see :func:`placed`."""
    if postprocess not in (None, "none", *POSTPROCESSORS):
        raise InvalidInput(f"postprocess {postprocess!r}: choose none or {', '.join(POSTPROCESSORS)}")
    place = placed(device, precision)
    paths = check_images(images, skip_bad)
    check_captioner(model)
    captioner = Captioner.from_pretrained(model, **place).eval()
    rows = []
    for start, x in _batches(paths, captioner.encoder.config.image_size, batch_size, "caption"):
        caps = caption_images(captioner, x, batch_size=batch_size, num_beams=num_beams,
                              max_new_tokens=max_new_tokens, postprocess=postprocess)
        rows += [{"image": p.name, "caption": c} for p, c in zip(paths[start : start + batch_size], caps, strict=True)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def reconstruct_files(images: list[Path], out: Path, encoder: str | Path, decoder: str | Path, batch_size: int = 64,
                      sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None, seed: int = 0,
                      skip_bad: bool = False, device: str | torch.device | None = None,
                      precision: str | torch.dtype | None = None) -> int:
    """Redraw image files from their embeddings into the folder ``out`` (file stems kept, PNG); returns the count.
    ``device``/``precision``: see :func:`placed`."""
    place = placed(device, precision)
    paths = check_images(images, skip_bad)
    resolve_decoder(decoder), encoder_config_of(encoder)
    enc, dec = VLVEncoder.from_pretrained(encoder, **place).eval(), DiffusionDecoder.from_pretrained(decoder, **place)
    Path(out).mkdir(parents=True, exist_ok=True)
    # The encoder's input size, resized once by PIL as Florence-2's processor does.
    for start, x in _batches(paths, enc.config.image_size, batch_size, "reconstruct"):
        recon = reconstruct_images(enc, dec, x, sampler=sampler, guidance_scale=guidance_scale, steps=steps,
                                   batch_size=batch_size, seed=seed + start)
        for p, im in zip(paths[start : start + batch_size], to_pil(recon), strict=True):
            atomic_save_png(im, Path(out) / (p.stem + ".png"))
    return len(paths)


def embed_files(images: list[Path], out: Path, encoder: str | Path, decoder: str | Path | None = None,
                batch_size: int = 64, skip_bad: bool = False, device: str | torch.device | None = None,
                precision: str | torch.dtype | None = None) -> dict[str, tuple[int, ...]]:
    """z (N, Nq, d_T) of image files, and T(z) when ``decoder`` is given, into the safetensors file ``out`` (the
    image paths in its metadata), fp32 whatever the precision; returns each tensor's shape. ``device``/
    ``precision``: see :func:`placed`."""
    place = placed(device, precision)
    paths = check_images(images, skip_bad)
    encoder_config_of(encoder)
    text_dir = resolve_decoder(decoder) if decoder else None
    enc = VLVEncoder.from_pretrained(encoder, **place).eval()
    text_encoder = load_text_encoder(text_dir, **place) if text_dir else None
    parts: dict[str, list[torch.Tensor]] = {"z": [], "T_z": []}
    for _, x in _batches(paths, enc.config.image_size, batch_size, "embed"):
        z = embed_images(enc, x, batch_size=batch_size)  # (B, Nq, d_T)
        parts["z"].append(z)
        if text_encoder is not None:
            parts["T_z"].append(text_embeds_of(text_encoder, z, batch_size=batch_size))  # (B, Nq, d_T)
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(tensors, out, metadata={"images": json.dumps([str(p) for p in paths]), "encoder": str(encoder)})
    return {k: tuple(v.shape) for k, v in tensors.items()}


def compose_files(a: Path, b: Path, out: Path, encoder: str | Path, decoder: str | Path, k: int | None = None,
                  sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None, seed: int = 0,
                  skip_bad: bool = False, device: str | torch.device | None = None,
                  precision: str | torch.dtype | None = None) -> int:
    """Paper Fig. 6 on two image files: one PNG ``out`` from the first k embeddings of each; returns k.
    ``device``/``precision``: see :func:`placed`."""
    place = placed(device, precision)
    for p in (a, b):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such image: {p}")
    if len(check_images([a, b], skip_bad)) < 2:
        raise InvalidInput("compose needs both images, and one is unreadable")
    nq, positions = encoder_config_of(encoder)["num_queries"], text_length(resolve_decoder(decoder))
    k = k or nq // 2
    if not 0 < k <= min(nq, positions // 2):
        raise InvalidInput(f"--k {k}: must be in 1..{min(nq, positions // 2)} (the encoder has {nq} embeddings, "
                           f"and the 2k of both images must fit the decoder's {positions} text positions)")
    enc, dec = VLVEncoder.from_pretrained(encoder, **place).eval(), DiffusionDecoder.from_pretrained(decoder, **place)
    x_a, x_b = (to_tensor(np.stack([load_image(p, enc.config.image_size)])) for p in (a, b))
    image = compose_images(enc, dec, x_a, x_b, k, sampler=sampler, guidance_scale=guidance_scale, steps=steps,
                           seed=seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_png(to_pil(image)[0], Path(out))
    return k
