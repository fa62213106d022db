"""Inference with trained VLV parts, batched: images -> z (embed), z -> images (reconstruct), images -> captions.

Images are uint8 (N, H, W, 3) as the encoder's transform cuts them (``encoder.transform.crop``), and become
pixel_values by that transform (``encoder.transform.pixels``), as in training; each function moves whole batches to
the model's device and dtype (bf16 comes from the weights themselves: the models load in the chosen dtype, so no
autocast is needed and the memory is halved) and returns fp32 CPU results in input order. The ``*_files`` jobs
(what ``vlv caption``, ``reconstruct``, ``embed`` and ``compose`` run) check every input, the device and the
precision included, before a model loads, then write their outputs atomically, batch by batch where a killed run
over many images should resume (:mod:`vlv.data.outputs`: image names relative to the input root, partial outputs,
torchrun ranks). The models load alone from their run dirs or shipped names, straight into the chosen device and
dtype: ``VLVEncoder.from_pretrained``, ``DiffusionDecoder.from_pretrained``, ``Captioner.from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlv.captioner import POSTPROCESSORS, Captioner
from vlv.checks import check_out, check_text_width, read_json, text_length
from vlv.data.datasets import ImageFiles
from vlv.data.images import Crop, list_images, open_image, to_pil
from vlv.data.loader import row_loader
from vlv.data.outputs import (
    Inputs,
    Partial,
    job_key,
    name_inputs,
    output_names,
    partial_folder,
    refuse_input_as_output,
)
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
from vlv.text_encoder import encode_embeds, load_text_encoder


@torch.no_grad()
def _pixels(encoder: VLVEncoder, images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One batch of uint8 images (B, H, W, 3) -> pixel_values by the encoder's transform, on its device, in its
    dtype. Made in fp32, then cast: bf16 holds normalised pixels to only ~3 digits."""
    device, dtype = placement(encoder)
    return encoder.transform.pixels(images, device).to(dtype)  # (B, 3, S, S)


def _embed(encoder: VLVEncoder, images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One batch of uint8 images -> z on the encoder's device, in its dtype."""
    return encoder(_pixels(encoder, images))  # (B, Nq, d_T)


def _cpu(x: torch.Tensor) -> torch.Tensor:
    """Results leave the device as fp32 on the CPU, whatever the model computed in."""
    return x.float().cpu()


@torch.no_grad()
def embed_images(encoder: VLVEncoder, images: torch.Tensor | np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """Images (N, H, W, 3) uint8 -> caption embeddings z (N, Nq, d_T), fp32 on the CPU."""
    return torch.cat([_cpu(_embed(encoder, images[s : s + batch_size])) for s in range(0, len(images), batch_size)])


@torch.no_grad()
def text_embeds_of(text_encoder: torch.nn.Module, z: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """T(z) (N, Nq, d_T) of caption embeddings z (N, Nq, d_T), through T on its device, fp32 on the CPU."""
    device, dtype = placement(text_encoder)
    return torch.cat([_cpu(encode_embeds(text_encoder, z[s : s + batch_size].to(device, dtype)))
                      for s in range(0, len(z), batch_size)])


@torch.no_grad()
def reconstruct_images(encoder: VLVEncoder, decoder: DiffusionDecoder, images: torch.Tensor | np.ndarray,
                       sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                       batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """Images (N, H, W, 3) uint8 -> reconstructions (N, 3, H', W') in [-1, 1], caption-free, batched; fp32 on the
    CPU.

    Each batch is seeded by its offset, so the result does not depend on ``batch_size``'s split of the work. The
    noise is drawn on the CPU whatever the device, so a GPU run starts from the same latents as a CPU run.
    """
    device, dtype = placement(decoder.denoiser)
    out = []
    for start in range(0, len(images), batch_size):
        z = _embed(encoder, images[start : start + batch_size]).to(device, dtype)  # (B, Nq, d_T)
        gen = torch.Generator().manual_seed(seed + start)
        out.append(_cpu(decoder.reconstruct(z, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                                            generator=gen)) * 2 - 1)
    return torch.cat(out)


@torch.no_grad()
def compose_images(encoder: VLVEncoder, decoder: DiffusionDecoder, a: torch.Tensor | np.ndarray,
                   b: torch.Tensor | np.ndarray, k: int,
                   sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Paper Fig. 6: images a and b (n, H, W, 3) uint8 -> one image each from the first k embeddings of both, fp32
    on the CPU."""
    device, dtype = placement(decoder.denoiser)
    z_a, z_b = (_embed(encoder, x).to(device, dtype) for x in (a, b))  # (n, Nq, d_T) each
    gen = torch.Generator().manual_seed(seed)
    return _cpu(decoder.reconstruct(compose(z_a, z_b, k), guidance_scale=guidance_scale, steps=steps,
                                    sampler=sampler, generator=gen)) * 2 - 1  # (n, 3, H', W') in [-1, 1]


@torch.no_grad()
def caption_images(captioner: Captioner, images: torch.Tensor | np.ndarray, batch_size: int = 64,
                   num_beams: int | None = None, max_new_tokens: int | None = None,
                   postprocess: str | None = None) -> list[str]:
    """Images (N, H, W, 3) uint8 -> N captions, batched through the encoder and ``generate`` on the captioner's
    device, in its dtype (options left None are the run's own)."""
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        pixel_values = _pixels(captioner.encoder, images[start : start + batch_size])  # (B, 3, S, S)
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
                raise BadImage(f"{e} (--on-bad-image skip skips unreadable images)") from None
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


def _batches(paths: list[Path], crop: Crop, batch_size: int, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, images (B, size, size, 3) uint8) of the files, streamed through the dataset reader a batch at a
    time (decoded and cut by the encoder's ``crop`` in the reader, as in training), with a progress bar. The files
    were checked already: one that has gone bad since fails naming it."""
    from vlv.progress import tqdm

    loader = row_loader(ImageFiles(paths), crop, 0, len(paths), batch_size, on_bad_image="fail")
    for start, batch in zip(range(0, len(paths), batch_size), tqdm(loader, desc=desc, unit="batch"), strict=True):
        yield start, batch["images"]


def read_inputs(images: list[Path], skip_bad: bool = False) -> Inputs:
    """The image files of ``images`` (files and folders), each named relative to the input root
    (:func:`vlv.data.outputs.name_inputs`) and decoded once now (:func:`check_images`)."""
    inputs = name_inputs(images)
    return inputs.only(check_images(inputs.paths, skip_bad))


def _start(partial: Partial, inputs: Inputs, units: int, per_unit: int) -> list[int]:
    """This rank's units still to do (unit u: inputs [u * per_unit, (u + 1) * per_unit)), after a resume note."""
    done = partial.start()
    if done and partial.is_main:
        print(f"resuming: {len(done)} of {len(inputs)} image(s) done in {partial.folder}")
    finished = {u for u in range(units) if all(n in done for n in inputs.names[u * per_unit : (u + 1) * per_unit])}
    return partial.mine(units, finished)


def caption_files(images: list[Path], out: Path, model: str | Path = "shapes-stage2", batch_size: int = 64,
                  num_beams: int | None = None, max_new_tokens: int | None = None, postprocess: str | None = None,
                  skip_bad: bool = False, device: str | torch.device | None = None,
                  precision: str | torch.dtype | None = None) -> int:
    """Caption image files into ``out`` (captions.jsonl: one ``{"image", "caption"}`` line each, ``image`` the name
    relative to the input root, in input order); returns the count. Resumable, and split over torchrun ranks
    (:mod:`vlv.data.outputs`). ``device``/``precision``: see :func:`placed`."""
    if postprocess not in (None, "none", *POSTPROCESSORS):
        raise InvalidInput(f"postprocess {postprocess!r}: choose none or {', '.join(POSTPROCESSORS)}")
    place = placed(device, precision)
    out = check_out(out, is_dir=False)
    inputs = read_inputs(images, skip_bad)
    refuse_input_as_output(out, inputs.paths)
    check_captioner(model)
    key = job_key("caption", inputs, [resolve_stage2(model)],
                  {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "postprocess": postprocess,
                   "precision": str(place["dtype"])})
    partial = Partial(partial_folder(out, is_dir=False), key)
    todo = _start(partial, inputs, len(inputs), 1)
    if todo:
        captioner = Captioner.from_pretrained(model, **place).eval()
        paths = [inputs.paths[i] for i in todo]
        for start, x in _batches(paths, captioner.encoder.transform.crop, batch_size, "caption"):
            idx = todo[start : start + batch_size]
            caps = caption_images(captioner, x, batch_size=batch_size, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens, postprocess=postprocess)
            rows = [{"image": inputs.names[i], "caption": c} for i, c in zip(idx, caps, strict=True)]
            partial.save_rows(idx[0], rows)
    partial.barrier()
    if partial.is_main:
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in partial.ordered_rows(inputs.names)))
    partial.finish()
    return len(inputs)


def reconstruct_files(images: list[Path], out: Path, encoder: str | Path, decoder: str | Path, batch_size: int = 64,
                      sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None, seed: int = 0,
                      skip_bad: bool = False, device: str | torch.device | None = None,
                      precision: str | torch.dtype | None = None) -> int:
    """Redraw image files from their embeddings into the folder ``out`` as PNGs, the inputs' relative paths
    mirrored (``sub/a.jpg`` -> ``out/sub/a.png``); returns the count. Resumable, and split over torchrun ranks
    batch by batch: a batch's seed follows its offset, so the pictures do not depend on the split.
    ``device``/``precision``: see :func:`placed`."""
    place = placed(device, precision)
    out = check_out(out, is_dir=True)
    inputs = read_inputs(images, skip_bad)
    targets = output_names(inputs, out, ".png")
    decoder_dir, encoder_dir = resolve_decoder(decoder), resolve_encoder(encoder)
    check_text_width(encoder_config_of(encoder)["text_dim"], decoder_dir, encoder, decoder)
    key = job_key("reconstruct", inputs, [encoder_dir, decoder_dir],
                  {"batch_size": batch_size, "sampler": sampler, "guidance_scale": guidance_scale, "steps": steps,
                   "seed": seed, "precision": str(place["dtype"])})
    partial = Partial(partial_folder(out, is_dir=True), key)
    mine = _start(partial, inputs, -(-len(inputs) // batch_size), batch_size)
    if mine:
        enc = VLVEncoder.from_pretrained(encoder, **place).eval()
        dec = DiffusionDecoder.from_pretrained(decoder, **place)
        # Only the last batch of all is short, so this rank's files re-batch into exactly its units.
        paths = [p for u in mine for p in inputs.paths[u * batch_size : (u + 1) * batch_size]]
        batches = _batches(paths, enc.transform.crop, batch_size, "reconstruct")
        for u, (_, x) in zip(mine, batches, strict=True):
            first = u * batch_size
            recon = reconstruct_images(enc, dec, x, sampler=sampler, guidance_scale=guidance_scale, steps=steps,
                                       batch_size=batch_size, seed=seed + first)
            names = range(first, first + len(x))
            for i, im in zip(names, to_pil(recon), strict=True):
                (Path(out) / targets[i]).parent.mkdir(parents=True, exist_ok=True)
                atomic_save_png(im, Path(out) / targets[i])
            partial.save_rows(first, [{"image": inputs.names[i], "reconstruction": targets[i]} for i in names])
    partial.barrier()
    partial.finish()
    return len(inputs)


def embed_files(images: list[Path], out: Path, encoder: str | Path, decoder: str | Path | None = None,
                batch_size: int = 64, skip_bad: bool = False, device: str | torch.device | None = None,
                precision: str | torch.dtype | None = None) -> dict[str, tuple[int, ...]]:
    """z (N, Nq, d_T) of image files, and T(z) when ``decoder`` is given, into the safetensors file ``out`` (the
    image names relative to the input root, and the root, in its metadata), fp32 whatever the precision; returns
    each tensor's shape. Resumable, and split over torchrun ranks. ``device``/``precision``: see :func:`placed`."""
    place = placed(device, precision)
    out = check_out(out, is_dir=False)
    inputs = read_inputs(images, skip_bad)
    refuse_input_as_output(out, inputs.paths)
    encoder_dir, z_width = resolve_encoder(encoder), encoder_config_of(encoder)["text_dim"]
    text_dir = resolve_decoder(decoder) if decoder else None
    if text_dir is not None:
        check_text_width(z_width, text_dir, encoder, decoder)
    key = job_key("embed", inputs, [encoder_dir, *([text_dir] if text_dir else [])],
                  {"T_z": text_dir is not None, "precision": str(place["dtype"])})
    partial = Partial(partial_folder(out, is_dir=False), key)
    todo = _start(partial, inputs, len(inputs), 1)
    if todo:
        enc = VLVEncoder.from_pretrained(encoder, **place).eval()
        text_encoder = load_text_encoder(text_dir, **place) if text_dir else None
        paths = [inputs.paths[i] for i in todo]
        for start, x in _batches(paths, enc.transform.crop, batch_size, "embed"):
            idx = todo[start : start + batch_size]
            tensors = {"z": embed_images(enc, x, batch_size=batch_size)}  # (B, Nq, d_T)
            if text_encoder is not None:
                tensors["T_z"] = text_embeds_of(text_encoder, tensors["z"], batch_size=batch_size)  # (B, Nq, d_T)
            partial.save_tensors(idx[0], [inputs.names[i] for i in idx], tensors)
    partial.barrier()
    if partial.is_main:
        metadata = {"images": json.dumps(inputs.names), "root": str(inputs.root), "encoder": str(encoder),
                    **({"decoder": str(decoder)} if decoder else {})}
        atomic_save_file(partial.tensors(inputs.names), out, metadata=metadata)
    partial.finish()
    return safetensors_shapes(out)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the file's header."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return dict(sorted(shapes.items(), key=lambda kv: kv[0] != "z"))  # z first, as written


def compose_files(a: Path, b: Path, out: Path, encoder: str | Path, decoder: str | Path, k: int | None = None,
                  sampler: Sampler = "fast", guidance_scale: float = 2.0, steps: int | None = None, seed: int = 0,
                  skip_bad: bool = False, device: str | torch.device | None = None,
                  precision: str | torch.dtype | None = None) -> int:
    """Paper Fig. 6 on two image files: one PNG ``out`` from the first k embeddings of each; returns k.
    ``device``/``precision``: see :func:`placed`."""
    place = placed(device, precision)
    out = check_out(out, is_dir=False)
    for p in (a, b):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such image: {p}")
    refuse_input_as_output(out, [a, b])
    if len(check_images([a, b], skip_bad)) < 2:
        raise InvalidInput("compose needs both images, and one is unreadable")
    config, decoder_dir = encoder_config_of(encoder), resolve_decoder(decoder)
    check_text_width(config["text_dim"], decoder_dir, encoder, decoder)
    nq, positions = config["num_queries"], text_length(decoder_dir)
    k = k or nq // 2
    if not 0 < k <= min(nq, positions // 2):
        raise InvalidInput(f"--k {k}: must be in 1..{min(nq, positions // 2)} (the encoder has {nq} embeddings, "
                           f"and the 2k of both images must fit the decoder's {positions} text positions)")
    enc = VLVEncoder.from_pretrained(encoder, **place).eval()
    dec = DiffusionDecoder.from_pretrained(decoder, **place)
    x_a, x_b = (np.stack([enc.transform.crop(open_image(p))]) for p in (a, b))
    image = compose_images(enc, dec, x_a, x_b, k, sampler=sampler, guidance_scale=guidance_scale, steps=steps,
                           seed=seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_png(to_pil(image)[0], Path(out))
    return k
