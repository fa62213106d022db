"""``vlv evaluate captions`` and ``vlv evaluate images``: files in, ``metrics.json`` and ``report.html`` out.

Each job checks every input (files, dirs, what Java and pycocoevalcap offer) before a model loads, and writes
its outputs atomically. :class:`ImageMeter` holds the networks of an image comparison and remembers the features
of images it has seen, so the protocols compare several render sets with one pass over the originals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlv.checks import require_dirs
from vlv.data.images import IMAGE_EXTENSIONS
from vlv.errors import InvalidInput
from vlv.evaluation import captions as cap
from vlv.evaluation.clip import Clip, check_clip_dir, clip_image_similarity, clip_score, ref_clip_score
from vlv.evaluation.images import (
    RESIZES,
    Crop,
    Resize,
    check_inception,
    fid,
    image_name,
    inception_features,
    kid,
    load_inception,
    pair_by_name,
)
from vlv.evaluation.report import Example, write_report
from vlv.modeling import write_json

METRICS_FILE = "metrics.json"
EXAMPLES = 12


def pick_device(device: str | None) -> str:
    """The device asked for, else cuda when present (under a launcher: this process's own GPU)."""
    from vlv.modeling import resolve_device

    return str(resolve_device(device))


def require_file(path: str | Path, what: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such {what}: {path}")
    return Path(path)


def named_images(folder: str | Path) -> dict[str, Path]:
    """The image files of a folder (not its subfolders) by name without extension; two files of one name (a.png,
    a.jpg) would pair ambiguously and are refused."""
    folder = Path(folder)
    require_dirs(folder)
    out: dict[str, Path] = {}
    for p in sorted(q for q in folder.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS):
        name = image_name(p, folder)
        if name in out:
            raise InvalidInput(f"{folder}: {out[name].name} and {p.name} share the name {name!r}; images pair by "
                               "name, so keep one")
        out[name] = p
    if not out:
        raise FileNotFoundError(f"no images in {folder}")
    return out


# ------------------------------------------------------------------------------------------- captions
def _image_files(root: Path, keys: list[str]) -> dict[str, Path]:
    """Each predicted image's file below ``root``: its path as written, else its file name there."""
    found, missing = {}, []
    for k in keys:
        for p in (root / k, root / Path(k).name):
            if p.is_file():
                found[k] = p
                break
        else:
            missing.append(k)
    if missing:
        raise FileNotFoundError(f"{len(missing)} predicted image(s) are not in --images {root} (first {missing[0]})")
    return found


def caption_clip_scores(clip: Clip, files: list[Path], preds: list[str], refs: list[list[str]],
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per image: CLIPScore and RefCLIPScore of its caption."""
    images = clip.embed_images(files, batch_size)
    texts = clip.embed_texts(preds)
    flat = clip.embed_texts([r for rs in refs for r in rs])
    splits = list(torch.split(flat, [len(rs) for rs in refs]))
    return clip_score(images, texts).numpy(), ref_clip_score(images, texts, splits).numpy()


def evaluate_captions(pred: str | Path, refs: str | Path, out: str | Path, clip: str | Path | None = None,
                      images: str | Path | None = None, java: bool | None = None, device: str | None = None,
                      batch_size: int = 64) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr-D (METEOR, SPICE with Java) of ``vlv caption``'s rows against references, and
    CLIPScore / RefCLIPScore with a local CLIP dir and the images' folder. Writes out/metrics.json, report.html.

    ``java``: None uses it when found; False never (pure-Python tokenisation); True requires it.
    """
    pred, refs, out = require_file(pred, "predictions file"), require_file(refs, "references file"), Path(out)
    cap.check_scorers()
    java = use_java(java)
    if clip is not None:
        check_clip_dir(clip)
        if images is None:
            raise InvalidInput("--clip needs --images: the folder the predicted image names are in")
    if images is not None:
        require_dirs(images)
    preds = cap.read_predictions(pred)
    matched = cap.match_references(preds, cap.read_references(refs))
    files = _image_files(Path(images), list(preds)) if images is not None else {}

    scores, per_image, notes = cap.coco_scores(preds, matched, java)
    if clip is not None:
        keys = list(preds)
        cs, rcs = caption_clip_scores(Clip(clip, pick_device(device)), [files[k] for k in keys],
                                      [preds[k] for k in keys], [matched[k] for k in keys], batch_size)
        scores["clipscore"], scores["refclipscore"] = float(cs.mean()), float(rcs.mean())
        for k, a, b in zip(keys, cs, rcs, strict=True):
            per_image[k].update(clipscore=float(a), refclipscore=float(b))
    metrics = {**scores, "n": len(preds), "notes": notes,
               "settings": {"predictions": str(pred), "references": str(refs),
                            "tokenizer": "PTB (Java)" if java else "pure-Python PTB-style (vlv)",
                            "cider": "CIDEr-D (pycocoevalcap Cider), document frequencies from these references",
                            **({"clip": str(clip)} if clip is not None else {})}}
    examples = [Example(k, [("image", files[k])] if k in files else [],
                        [("predicted", preds[k]), *(("reference", r) for r in matched[k][:5]),
                         ("scores", ", ".join(f"{m} {v:.3f}" for m, v in per_image[k].items()))])
                for k in list(preds)[:EXAMPLES]]
    finish(out, "Caption metrics", metrics, examples)
    return metrics


def use_java(java: bool | None) -> bool:
    found = cap.java_available()
    if java and not found:
        raise InvalidInput("Java was asked for, but there is no java on the PATH")
    return found if java is None else bool(java)


def finish(out: Path, title: str, metrics: dict[str, Any], examples: list[Example]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, metrics)
    write_report(out, title, metrics, examples)
    for note in metrics.get("notes", []):
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------- images
@dataclass
class ImageMeter:
    """FID / KID (and CLIP-I with a CLIP dir) of generated images against real ones, pairing them by name.

    Features are remembered per file, so the real side of several comparisons is read once.
    """

    inception: str | Path
    clip: str | Path | None = None
    resize: Resize = "clean"
    crop_real: Crop = "none"
    crop_gen: Crop = "none"
    batch_size: int = 50
    device: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    _net: Any = field(default=None, init=False, repr=False)
    _clip: Any = field(default=None, init=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def check(self) -> None:
        """Inputs read now, before any network loads."""
        if self.resize not in RESIZES:
            raise InvalidInput(f"resize {self.resize!r}: choose {' or '.join(RESIZES)}")
        check_inception(self.inception)
        if self.clip is not None:
            check_clip_dir(self.clip)

    def _features(self, kind: str, paths: list[Path], crop: Crop, desc: str, remember: bool = False) -> np.ndarray:
        """Features (N, D) of the files, computed for those not remembered; ``remember``: keep them (the real side,
        which every comparison of a protocol shares)."""
        todo = [p for p in paths if (kind, p, crop) not in self._cache]
        found = dict(zip(todo, self._compute(kind, todo, crop, desc), strict=True)) if todo else {}
        if remember:
            self._cache.update({(kind, p, crop): r for p, r in found.items()})
        return np.stack([found[p] if p in found else self._cache[(kind, p, crop)] for p in paths])

    def _compute(self, kind: str, paths: list[Path], crop: Crop, desc: str) -> np.ndarray:
        device = pick_device(self.device)
        if kind == "inception":
            if self._net is None:
                self._net = load_inception(self.inception, device)
            return inception_features(self._net, paths, self.resize, crop, self.batch_size, device, progress=True,
                                      desc=desc)
        if self._clip is None:
            self._clip = Clip(self.clip, device)  # type: ignore[arg-type]
        return self._clip.embed_images(paths, self.batch_size).numpy()

    def measure(self, gen: dict[str, Path], real: dict[str, Path]) -> tuple[dict[str, Any], list[str]]:
        """(metrics, paired names). With names in common only those pairs count; with none, every image does and
        CLIP-I (which needs pairs) is left out."""
        names = pair_by_name(gen, real)
        gen_paths = [gen[n] for n in names] if names else list(gen.values())
        real_paths = [real[n] for n in names] if names else list(real.values())
        a = self._features("inception", gen_paths, self.crop_gen, "inception: generated")
        b = self._features("inception", real_paths, self.crop_real, "inception: real", remember=True)
        kid_mean, kid_std, m = kid(a, b, self.kid_subsets, self.kid_subset_size, self.seed)
        metrics: dict[str, Any] = {"fid": fid(a, b), "kid": kid_mean, "kid_std": kid_std, "n_gen": len(a),
                                   "n_real": len(b), "paired": len(names), "kid_subset_size": m}
        if self.clip is not None and names:
            sim = clip_image_similarity(torch.from_numpy(self._features("clip", gen_paths, "none", "clip")),
                                        torch.from_numpy(self._features("clip", real_paths, "none", "clip",
                                                                        remember=True)))
            metrics["clip_i"] = float(sim.mean())
        return metrics, names

    def settings(self) -> dict[str, Any]:
        return {"inception": str(self.inception), "resize": f"{self.resize}: {RESIZES[self.resize]}",
                "crop_real": self.crop_real, "crop_generated": self.crop_gen,
                "kid": f"unbiased MMD^2, cubic polynomial kernel, {self.kid_subsets} subsets, seed {self.seed}",
                **({"clip": str(self.clip)} if self.clip is not None else {})}


def evaluate_images(gen: str | Path, real: str | Path, inception: str | Path, out: str | Path,
                    clip: str | Path | None = None, resize: Resize = "clean", crop: Crop = "none",
                    batch_size: int = 50, device: str | None = None) -> dict[str, Any]:
    """FID and KID of the images of folder ``gen`` against folder ``real`` (and CLIP-I with a CLIP dir), pairing
    files by name where both folders have it. Writes out/metrics.json and report.html."""
    out = Path(out)
    meter = ImageMeter(inception, clip, resize, crop_real=crop, crop_gen=crop, batch_size=batch_size, device=device)
    meter.check()
    gen_files, real_files = named_images(gen), named_images(real)
    metrics, names = meter.measure(gen_files, real_files)
    notes = [] if names else [f"no image names in common: FID/KID over all {len(gen_files)} and {len(real_files)} "
                              "images, and no CLIP-I (it compares pairs)"]
    if names and (len(names) < len(gen_files) or len(names) < len(real_files)):
        notes.append(f"{len(names)} pair(s) by name: {len(gen_files) - len(names)} generated and "
                     f"{len(real_files) - len(names)} real image(s) without a partner left out")
    metrics = {**metrics, "notes": notes, "settings": {"generated": str(gen), "real": str(real), **meter.settings()}}
    examples = [Example(n, [("real", real_files[n]), ("generated", gen_files[n])]) for n in names[:EXAMPLES]]
    finish(out, "Image metrics", metrics, examples)
    return metrics
