"""A local CLIP model (transformers' ``CLIPModel``) for CLIPScore, RefCLIPScore and CLIP image similarity.

CLIPScore (Hessel et al. 2021) = 2.5 * max(cos(image, "A photo depicts " + caption), 0); RefCLIPScore = the
harmonic mean of CLIPScore and the largest cosine between the caption and a reference (the references carry the
same prompt), as the authors' ``clipscore.py`` computes them; they used ViT-B/32. CLIP-I is the mean cosine between
the CLIP embeddings of two paired images. Images go through CLIP's own preprocessing (PIL bicubic resize of the short
side, centre crop: ``CLIPImageProcessorPil``), the same with or without torchvision installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from vlv.checks import TOKENIZER_FILES, WEIGHTS_SUFFIXES, check_weights_in, read_json
from vlv.data.images import open_image
from vlv.errors import InvalidInput

PROMPT = "A photo depicts "  # clipscore.py's prefix for candidates and references
WEIGHT = 2.5
FETCH = "download a CLIP model in transformers' layout (CLIPScore used ViT-B/32) into a local dir and pass that dir"


def check_clip_dir(path: str | Path) -> Path:
    """A local CLIP dir vlv can load (config, image processor, tokenizer, weights), read but not loaded."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no CLIP model dir {path}: {FETCH}")
    for name in ("config.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a CLIP model dir (no {name}): {FETCH}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} is not a CLIP model dir (no tokenizer files): {FETCH}")
    if not any(f.suffix in WEIGHTS_SUFFIXES for f in path.iterdir()):
        raise FileNotFoundError(f"{path} is not a CLIP model dir (no weights): {FETCH}")
    model_type = read_json(path / "config.json").get("model_type")
    if model_type != "clip":
        raise InvalidInput(f"{path}: a {model_type!r} model, not CLIP (config.json model_type must be \"clip\")")
    check_weights_in(path)
    return path


class Clip:
    """CLIP's image and text towers, giving unit-length embeddings (fp32, on the CPU)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        path = check_clip_dir(path)
        self.path, self.device = path, torch.device(device)
        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image | Path], batch_size: int = 64) -> torch.Tensor:
        """Images or image files -> (N, D) unit vectors; files are decoded a batch at a time."""
        return self._batched(images, batch_size, self._image_batch)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, prompt: str = PROMPT) -> torch.Tensor:
        """Texts, each after ``prompt`` and cut to CLIP's context, -> (N, D) unit vectors."""
        return self._batched([prompt + t for t in texts], batch_size, self._text_batch)

    def _batched(self, items: Sequence, batch_size: int, embed: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
        out = [embed(items[s : s + batch_size]) for s in range(0, len(items), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def _image_batch(self, images: Sequence[Image.Image | Path]) -> torch.Tensor:
        pil = [im if isinstance(im, Image.Image) else open_image(im) for im in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)  # (B, 3, S, S)
        return _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)

    def _text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return _unit(self.model.get_text_features(**tokens).pooler_output)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def clip_score(images: torch.Tensor, texts: torch.Tensor, weight: float = WEIGHT) -> torch.Tensor:
    """Per pair: weight * max(cos, 0), of unit embeddings (N, D) and (N, D)."""
    return weight * (images * texts).sum(-1).clamp(min=0)


def ref_clip_score(images: torch.Tensor, texts: torch.Tensor, refs: Sequence[torch.Tensor],
                   weight: float = WEIGHT) -> torch.Tensor:
    """Per caption: the harmonic mean of its CLIPScore and its largest cosine to its references ((R_i, D) each)."""
    if len(refs) != len(texts) or any(len(r) == 0 for r in refs):
        raise InvalidInput("RefCLIPScore needs at least one reference per caption")
    cs = clip_score(images, texts, weight)
    best = torch.stack([(r @ t).max() for t, r in zip(texts, refs, strict=True)])
    total = cs + best
    return torch.where(total > 0, 2 * cs * best / total.where(total > 0, torch.ones_like(total)), 0.0)


def clip_image_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair: cos(CLIP(a_i), CLIP(b_i)), of unit embeddings (N, D) and (N, D)."""
    return (a * b).sum(-1)
