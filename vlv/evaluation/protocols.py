"""The paper's image protocols, one job each, resumable: every per-image output already in the out dir is reused.

- :func:`caption_to_image` (Table 1): images -> captions (a stage-2 run through ``vlv.inference.caption_files``,
  or a captions file) -> any local diffusers text-to-image pipeline (the paper: SD 3.5 Medium, 40 steps, CFG 1-4)
  -> FID / KID / CLIP-I against the originals, one set of numbers per CFG scale.
- :func:`reconstruction` (Tables 4 and 5, left): images -> z -> the frozen decoder
  (``vlv.inference.reconstruct_files``) -> FID / KID / CLIP-I against the originals, per CFG scale.

The out dir holds ``captions.jsonl``, ``renders/cfg-<g>/<name>.png`` or ``reconstructions/cfg-<g>/<name>.png``,
``metrics.json`` and ``report.html``. A killed run started again makes only what is missing. Renders are seeded per
image (seed + the image's index in the sorted input), so a resumed run draws what an uninterrupted one would; a
reconstruction's noise is seeded per batch by ``reconstruct_files``, so resumed ones draw other (equally random)
noise. An out dir belongs to one setting (``protocol.json``: the model, pipeline, steps, seed, ...); another
CFG scale adds its own folder, anything else needs another out dir. The originals are compared as their centre
square, what vlv's encoder sees of them (recorded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlv.checks import read_json
from vlv.data.outputs import process_state
from vlv.errors import InvalidInput
from vlv.evaluation import captions as cap
from vlv.evaluation.jobs import EXAMPLES, ImageMeter, finish, pick_device, require_file, use_java
from vlv.evaluation.report import Example
from vlv.inference import caption_files, check_captioner, check_images, encoder_config_of, reconstruct_files
from vlv.modeling import atomic_save_png, atomic_write_text, write_json
from vlv.shipped import SHIPPED, resolve_decoder

CAPTIONS_FILE, PROTOCOL_FILE = "captions.jsonl", "protocol.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIPELINE_FETCH = "download the text-to-image pipeline (the paper: Stable Diffusion 3.5 Medium) into a local dir"


def claim_out(out: Path, made_with: dict[str, Any]) -> None:
    """An out dir holds the outputs of one setting: reusing them under another (other steps, seed, model, ...)
    would mix two experiments, so it is refused; the first run records its setting in ``protocol.json``. Every
    process checks (so all refuse alike), the main one writes, then all go on together."""
    state = process_state()
    _claim(out, made_with, write=state.is_main_process)
    state.wait_for_everyone()


def _claim(out: Path, made_with: dict[str, Any], write: bool) -> None:
    record = out / PROTOCOL_FILE
    made_with = json.loads(json.dumps(made_with))  # as it reads back
    if record.is_file():
        before = read_json(record)
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in made_with.items() if before.get(k) != v]
        if changed:
            raise InvalidInput(f"--out {out} holds outputs made with other settings ({'; '.join(changed)}): pass "
                               "another --out, or delete it to start over")
        return
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_json(record, made_with)


def cfg_dir(g: float) -> str:
    return f"cfg-{g:g}"


def _images_by_stem(images: Sequence[Path], skip_bad: bool) -> dict[str, Path]:
    """The input image files (checked to decode) by file stem, which names every output; stems must be unique."""
    paths = check_images(list(images), skip_bad)
    out: dict[str, Path] = {}
    for p in sorted(paths, key=lambda q: q.stem):
        if p.stem in out:
            raise InvalidInput(f"{out[p.stem]} and {p} share the name {p.stem!r}; outputs are named by it, so "
                               "rename one")
        out[p.stem] = p
    return out


def resolve_pipeline(name_or_path: str | Path) -> Path:
    """A local diffusers pipeline dir (model_index.json), or the shipped shapes teacher by name."""
    if str(name_or_path) in SHIPPED:
        return resolve_decoder(name_or_path)
    path = Path(name_or_path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline dir (no model_index.json): {PIPELINE_FETCH}")
    return path


def load_text_to_image(path: Path, device: str, precision: str = "fp32"):
    """``DiffusionPipeline.from_pretrained`` of a local dir (no hub, no remote code), progress bars off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=DTYPES[precision], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------- captions
def _read_rows(path: Path) -> dict[str, str]:
    return cap.read_predictions(path) if path.is_file() else {}


def _captions_for(images: dict[str, Path], rows: dict[str, str], source: Path) -> dict[str, str]:
    """Each image's caption from rows named by image path (the file name, or a longer or shorter path)."""
    keys = {stem: cap.image_key(p.name) for stem, p in images.items()}
    matched, missing = cap.match_names(list(keys.values()), list(rows))
    if missing:
        raise InvalidInput(f"{source}: no caption for {len(missing)} of {len(keys)} image(s) (first {missing[0]})")
    return {stem: rows[matched[k]] for stem, k in keys.items()}


def make_captions(images: dict[str, Path], out: Path, model: str | Path, batch_size: int = 64,
                  num_beams: int | None = None, max_new_tokens: int | None = None,
                  postprocess: str | None = None) -> dict[str, str]:
    """out/captions.jsonl for the images (``vlv caption``'s rows, input order), captioning only those it lacks."""
    path, part = out / CAPTIONS_FILE, out / f"{CAPTIONS_FILE}.part"
    done = _read_rows(path)
    _, missing = cap.match_names([cap.image_key(p.name) for p in images.values()], list(done))
    if missing:
        todo = [p for p in images.values() if cap.image_key(p.name) in set(missing)]
        caption_files(todo, part, model=model, batch_size=batch_size, num_beams=num_beams,  # every process a slice
                      max_new_tokens=max_new_tokens, postprocess=postprocess)
        state = process_state()
        if state.is_main_process:
            done.update(cap.read_predictions(part))
            texts = _captions_for(images, done, part)
            atomic_write_text(path, "".join(json.dumps({"image": p.name, "caption": texts[s]}) + "\n"
                                            for s, p in images.items()))
            part.unlink()
        state.wait_for_everyone()
        done = _read_rows(path)
    return _captions_for(images, done, path)


# ----------------------------------------------------------------------------------------------- renders
def render_captions(pipe, captions: dict[str, str], folder: Path, guidance_scale: float, steps: int,
                    seed: int = 0, resolution: int | None = None, batch_size: int = 8) -> int:
    """folder/<name>.png of each caption not yet rendered; image i of the sorted names is seeded seed + i, so the
    renders do not depend on how many processes share the work (each takes every world-size-th one). Returns how
    many this process made."""
    from vlv.progress import tqdm

    state = process_state()
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(captions)
    todo = [i for i, n in enumerate(names) if not (folder / f"{n}.png").is_file()]
    todo = todo[state.process_index :: state.num_processes]
    size = {"height": resolution, "width": resolution} if resolution else {}
    for s in tqdm(range(0, len(todo), batch_size), desc=f"render {folder.name}", unit="batch"):
        idx = todo[s : s + batch_size]
        images = pipe(prompt=[captions[names[i]] for i in idx], num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(seed + i) for i in idx],
                      output_type="pil", **size).images
        for i, im in zip(idx, images, strict=True):
            atomic_save_png(im, folder / f"{names[i]}.png")
    state.wait_for_everyone()
    return len(todo)


def _pngs(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    return {n: folder / f"{n}.png" for n in names}


def _check_cfg(cfg: Sequence[float]) -> list[float]:
    if not cfg or any(g < 0 for g in cfg):
        raise InvalidInput(f"--cfg {list(cfg)}: give one or more scales >= 0")
    return sorted(set(map(float, cfg)))


# ----------------------------------------------------------------------------------------------- Table 1
def caption_to_image(images: Sequence[Path], out: str | Path, pipeline: str | Path, inception: str | Path,
                     model: str | Path | None = None, captions: str | Path | None = None,
                     cfg: Sequence[float] = (1.0, 2.0, 3.0, 4.0), steps: int = 40, resolution: int | None = None,
                     seed: int = 0, refs: str | Path | None = None, clip: str | Path | None = None,
                     batch_size: int = 8, caption_batch_size: int = 64, num_beams: int | None = None,
                     max_new_tokens: int | None = None, postprocess: str | None = None, device: str | None = None,
                     precision: str = "fp32", resize: str = "clean", java: bool | None = None,
                     skip_bad: bool = False) -> dict[str, Any]:
    """Paper Table 1: caption the images (``model``, a stage-2 run) or take ``captions`` (a jsonl of ``{"image",
    "caption"}``), render each caption with the pipeline at each CFG scale, and measure the renders against the
    originals; with ``refs``, the captions' BLEU / ROUGE-L / CIDEr-D too."""
    out = Path(out)
    if (model is None) == (captions is None):
        raise InvalidInput("give either --model (a stage-2 run to caption with) or --captions (a captions file)")
    if precision not in DTYPES:
        raise InvalidInput(f"precision {precision!r}: choose {', '.join(DTYPES)}")
    cfg = _check_cfg(cfg)
    meter = ImageMeter(inception, clip, resize, crop_real="center", crop_gen="none", device=device)  # type: ignore[arg-type]
    meter.check()
    pipeline_dir = resolve_pipeline(pipeline)
    if model is not None:
        check_captioner(model)
    else:
        require_file(captions, "captions file")
    reference_rows = None
    if refs is not None:
        cap.check_scorers()
        java = use_java(java)
        reference_rows = cap.read_references(require_file(refs, "references file"))
    originals = _images_by_stem(images, skip_bad)
    given = _captions_for(originals, cap.read_predictions(captions), Path(captions)) if captions else None
    if reference_rows is not None:  # every image has references: found now, not after the captioning
        cap.match_references({cap.image_key(p.name): "" for p in originals.values()}, reference_rows)

    claim_out(out, {"protocol": "caption-to-image", "captions": str(captions) if captions else None,
                    "model": str(model) if model else None, "num_beams": num_beams,
                    "max_new_tokens": max_new_tokens, "postprocess": postprocess, "pipeline": str(pipeline_dir),
                    "steps": steps, "seed": seed, "resolution": resolution, "precision": precision})
    texts = given or make_captions(originals, out, model, caption_batch_size, num_beams, max_new_tokens, postprocess)
    metrics: dict[str, Any] = {"protocol": "caption -> text-to-image -> FID against the originals (paper Table 1)"}
    notes: list[str] = []
    state = process_state()  # under a launcher every process renders a slice; the main one measures
    if reference_rows is not None and state.is_main_process:
        preds = {cap.image_key(originals[s].name): t for s, t in texts.items()}
        scores, _, notes = cap.coco_scores(preds, cap.match_references(preds, reference_rows), bool(java))
        metrics["captions"] = scores
    pipe = None
    device = pick_device(device)
    metrics["by_cfg"] = {}
    for g in cfg:
        folder = out / "renders" / cfg_dir(g)
        state.wait_for_everyone()  # so every process sees the same renders done
        if any(not p.is_file() for p in _pngs(folder, texts).values()):
            pipe = pipe or load_text_to_image(pipeline_dir, device, precision)
            render_captions(pipe, texts, folder, g, steps, seed, resolution, batch_size)
        if state.is_main_process:
            metrics["by_cfg"][f"{g:g}"], _ = meter.measure(_pngs(folder, texts), originals)
    if not state.is_main_process:
        return {}
    metrics.update(notes=notes, settings={
        "images": len(originals), "captions": str(captions) if captions else f"{model} (captions.jsonl)",
        "pipeline": str(pipeline_dir), "steps": steps, "cfg": cfg, "seed": seed, "precision": precision,
        "resolution": resolution or "the pipeline's default", "scheduler": "the pipeline's own",
        **meter.settings()})
    examples = [Example(s, [("original", originals[s]), *((f"CFG {g:g}", out / "renders" / cfg_dir(g) / f"{s}.png")
                                                           for g in cfg)], [("caption", texts[s])])
                for s in list(originals)[:EXAMPLES]]
    finish(out, "Caption -> image (paper Table 1)", metrics, examples)
    return metrics


# ----------------------------------------------------------------------------------------------- Tables 4/5
def reconstruction(images: Sequence[Path], out: str | Path, encoder: str | Path, decoder: str | Path,
                   inception: str | Path, cfg: Sequence[float] = (2.0,), sampler: str = "paper",
                   steps: int | None = None, seed: int = 0, clip: str | Path | None = None, batch_size: int = 16,
                   device: str | None = None, resize: str = "clean", skip_bad: bool = False) -> dict[str, Any]:
    """Paper Tables 4 and 5 (left): reconstruct the images from z through the decoder at each CFG scale and
    measure the reconstructions against the originals."""
    out = Path(out)
    cfg = _check_cfg(cfg)
    meter = ImageMeter(inception, clip, resize, crop_real="center", crop_gen="none", device=device)  # type: ignore[arg-type]
    meter.check()
    resolve_decoder(decoder), encoder_config_of(encoder)
    originals = _images_by_stem(images, skip_bad)
    claim_out(out, {"protocol": "reconstruction", "encoder": str(encoder), "decoder": str(decoder),
                    "sampler": sampler, "steps": steps, "seed": seed})
    metrics: dict[str, Any] = {"protocol": "image -> z -> decoder -> FID against the originals (paper Tables 4, 5)",
                               "by_cfg": {}}
    state = process_state()  # under a launcher every process reconstructs a slice; the main one measures
    for g in cfg:
        folder = out / "reconstructions" / cfg_dir(g)
        state.wait_for_everyone()  # so every process sees the same reconstructions done
        todo = [p for s, p in originals.items() if not (folder / f"{s}.png").is_file()]
        if todo:
            reconstruct_files(todo, folder, encoder, decoder, batch_size=batch_size, sampler=sampler,  # type: ignore[arg-type]
                              guidance_scale=g, steps=steps, seed=seed)
        if state.is_main_process:
            metrics["by_cfg"][f"{g:g}"], _ = meter.measure(_pngs(folder, originals), originals)
    if not state.is_main_process:
        return {}
    metrics["settings"] = {"images": len(originals), "encoder": str(encoder), "decoder": str(decoder),
                           "sampler": sampler, "steps": steps or "the sampler's", "cfg": cfg, "seed": seed,
                           **meter.settings()}
    examples = [Example(s, [("original", originals[s]),
                            *((f"CFG {g:g}", out / "reconstructions" / cfg_dir(g) / f"{s}.png") for g in cfg)])
                for s in list(originals)[:EXAMPLES]]
    finish(out, "Reconstruction from z (paper Tables 4, 5)", metrics, examples)
    return metrics
