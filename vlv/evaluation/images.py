"""FID and KID from Inception-v3 pool features, with the TorchScript network StyleGAN2-ADA and clean-fid use.

The network is the user's file ``inception-2015-12-05.pt`` (the TF "2015-12-05" weights), loaded with
``torch.jit.load`` and called as ``net(x, return_features=True)`` on float images in [0, 255], N x 3 x H x W,
giving N x 2048; it resizes to 299 itself. How an image reaches it is the resize protocol, recorded with the
numbers:

- ``clean`` (default): clean-fid's "clean" mode: each channel as a float32 PIL image, bicubic to 299 x 299 and
  clipped to [0, 255], so the network's own resize does nothing;
- ``network``: the image at its own size, resized by the network (StyleGAN2-ADA's protocol; bilinear in the file).

Optionally the centre square is cut first (``crop="center"``: what vlv's encoder sees of an image). FID is the
Fréchet distance of Gaussians fitted to the two feature sets; KID the unbiased squared MMD with the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (StyleGAN2-ADA's and clean-fid's
estimator: 100 subsets of at most 1000).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from vlv.data.images import open_image
from vlv.errors import InvalidInput

Resize = Literal["clean", "network"]
Crop = Literal["none", "center"]
RESIZES: dict[str, str] = {
    "clean": "clean-fid 'clean': per-channel float32 PIL bicubic to 299x299, clipped to [0, 255]",
    "network": "the image at its own size; the Inception network resizes it to 299 (StyleGAN2-ADA)",
}
INCEPTION_SIZE = 299
FETCH = ("fetch the TorchScript Inception-v3 'inception-2015-12-05.pt' that StyleGAN2-ADA and clean-fid use "
         "(nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt) and pass "
         "--inception FILE")


def check_inception(path: str | Path) -> Path:
    """The network file exists (it is loaded later)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception network at {path}: {FETCH}")
    return path


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """``torch.jit.load`` of the network, probed once with one image: it must give one feature row."""
    path = check_inception(path)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, and still the format of the file users have
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise InvalidInput(f"{path}: not a TorchScript file torch.jit.load reads ({str(e).splitlines()[0]}); "
                           f"{FETCH}") from None
    with torch.no_grad():
        try:
            out = net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device), return_features=True)
        except RuntimeError as e:
            raise InvalidInput(f"{path}: net(x, return_features=True) fails on a 1x3x299x299 image "
                               f"({str(e).splitlines()[0]}); {FETCH}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise InvalidInput(f"{path}: net(x, return_features=True) must give N x D features, got "
                           f"{getattr(out, 'shape', type(out).__name__)}")
    return net


def center_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def inception_input(im: Image.Image, resize: Resize = "clean", crop: Crop = "none") -> np.ndarray:
    """An RGB image -> float32 (3, H, W) in [0, 255], as the protocol hands it to the network."""
    if crop == "center":
        im = center_square(im)
    x = np.asarray(im.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    if resize == "clean":
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        x = np.stack([np.asarray(Image.fromarray(x[:, :, c], mode="F").resize(size, Image.BICUBIC)).clip(0, 255)
                      for c in range(3)], axis=-1)
    elif resize != "network":
        raise InvalidInput(f"resize {resize!r}: choose {' or '.join(RESIZES)}")
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@torch.no_grad()
def inception_features(net: torch.jit.ScriptModule, images: Sequence[Path | Image.Image], resize: Resize = "clean",
                       crop: Crop = "none", batch_size: int = 50, device: str | torch.device = "cpu",
                       progress: bool = False, desc: str = "inception") -> np.ndarray:
    """Pool features (N, D) float64 of image files or PIL images, in input order. Under ``network`` a batch holds
    images of one size (the network resizes each batch as a whole)."""
    from vlv.progress import tqdm

    rows: list[np.ndarray | None] = [None] * len(images)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
        by_size: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = defaultdict(list)
        for i in range(start, min(start + batch_size, len(images))):
            im = images[i] if isinstance(images[i], Image.Image) else open_image(images[i])
            x = inception_input(im, resize, crop)
            by_size[x.shape].append((i, x))
        for group in by_size.values():
            x = torch.from_numpy(np.stack([a for _, a in group])).to(device)  # (B, 3, H, W) in [0, 255]
            feats = net(x, return_features=True).double().cpu().numpy()  # (B, D)
            for (i, _), f in zip(group, feats, strict=True):
                rows[i] = f
    return np.stack(rows)  # type: ignore[arg-type]


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (similar to S1 S2,
    symmetric and PSD), so the trace comes from two symmetric eigendecompositions: no complex parts to discard, as
    scipy.linalg.sqrtm of the non-symmetric product leaves on rank-deficient covariances.
    """
    root = _sqrt_psd(sigma1)
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets (N, D) and (M, D), each at least 2 rows.

    With fewer rows than dimensions on a side, the covariances have low rank and the trace comes from the rows:
    with centred rows A and B, tr((S1 S2)^1/2) is the sum of the singular values of A B^T over
    sqrt((N - 1)(M - 1)) (the nonzero eigenvalues of A^T A B^T B are those of (A B^T)(A B^T)^T), an N x M problem
    instead of two D x D ones.
    """
    if len(a) < 2 or len(b) < 2:
        raise InvalidInput(f"FID needs at least 2 images a side, got {len(a)} and {len(b)}")
    n, m, d = len(a), len(b), a.shape[1]
    mu_a, mu_b = a.mean(0), b.mean(0)
    if min(n, m) >= d:
        return frechet_distance(mu_a, np.cov(a, rowvar=False), mu_b, np.cov(b, rowvar=False))
    ca, cb = a - mu_a, b - mu_b
    tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = mu_a - mu_b
    return float(diff @ diff + (ca * ca).sum() / (n - 1) + (cb * cb).sum() / (m - 1) - 2 * tr_covmean)


def kid(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float, int]:
    """(mean, std over subsets, subset size) of the unbiased squared MMD, cubic polynomial kernel."""
    m = min(len(a), len(b), max_subset_size)
    if m < 2:
        raise InvalidInput(f"KID needs at least 2 images a side, got {len(a)} and {len(b)}")
    d, rng, values = a.shape[1], np.random.RandomState(seed), []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values)), m


def image_name(path: Path, root: Path | None) -> str:
    """An image's pairing key: its path below the folder given, without the extension (renders are PNG whatever
    the originals were)."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    return rel.with_suffix("").as_posix()


def pair_by_name(gen: dict[str, Path], real: dict[str, Path]) -> list[str]:
    """The names both sides have, in sorted order."""
    return sorted(set(gen) & set(real))
