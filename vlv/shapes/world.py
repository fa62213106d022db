"""The shapes world, version 1 (``docs/shapes-world.md``), implemented to the pixel.

It stands in for LAION: a captioned image distribution whose captions are exact, so every stage of
VLV is measured by exact comparison (scene accuracy, object F1, attribute accuracy) rather than by a
judge model. Two readers close the loop: :func:`parse_caption` reads text, :func:`detect` reads pixels
(robust to blur and colour drift, because it must read diffusion samples).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 205, 50),
    "purple": (150, 70, 190),
    "cyan": (60, 200, 210),
}
SIZES: dict[str, int] = {"small": 6, "large": 11}  # radius r in pixels
# Reading order; centres as (x, y), x to the right, y down.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
}
JITTER = 3
SPLITS = ("train", "val", "test")

Fact = tuple[str, str, str, str]  # (position, shape, color, size): what the measures compare


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str
    dx: int = 0
    dy: int = 0

    @property
    def fact(self) -> Fact:
        return (self.position, self.shape, self.color, self.size)


@dataclass(frozen=True)
class Scene:
    """1-3 objects, one per quadrant, kept in reading order of their quadrants."""

    objects: tuple[ShapeObject, ...]

    def to_json(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        return make_scene([ShapeObject(**o) for o in data["objects"]])

    @property
    def facts(self) -> set[Fact]:
        return {o.fact for o in self.objects}

    def key(self) -> str:
        """Canonical text of the scene, used to hash it into a split."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def make_scene(objects: list[ShapeObject]) -> Scene:
    """Validate and order objects; raises ValueError on anything the spec does not allow."""
    if not 1 <= len(objects) <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, got {len(objects)}")
    order = list(POSITIONS)
    for o in objects:
        if o.shape not in SHAPES or o.color not in COLORS or o.size not in SIZES or o.position not in POSITIONS:
            raise ValueError(f"unknown attribute in {o}")
        if abs(o.dx) > JITTER or abs(o.dy) > JITTER:
            raise ValueError(f"jitter out of [-{JITTER}, {JITTER}] in {o}")
    if len({o.position for o in objects}) != len(objects):
        raise ValueError("two objects share a quadrant")
    return Scene(tuple(sorted(objects, key=lambda o: order.index(o.position))))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: count uniform in {1,2,3}, quadrants without replacement, attributes uniform."""
    count = int(rng.integers(1, 4))
    quadrants = rng.choice(len(POSITIONS), size=count, replace=False)
    positions, colors = list(POSITIONS), list(COLORS)
    objects = [
        ShapeObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=colors[int(rng.integers(len(colors)))],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            position=positions[int(q)],
            dx=int(rng.integers(-JITTER, JITTER + 1)),
            dy=int(rng.integers(-JITTER, JITTER + 1)),
        )
        for q in quadrants
    ]
    return make_scene(objects)


def render(scene: Scene) -> Image.Image:
    """64x64 RGB, grey background, filled shapes in reading order, no outline, no anti-aliasing."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        qx, qy = POSITIONS[o.position]
        cx, cy, r = qx + o.dx, qy + o.dy, SIZES[o.size]
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


# ---------------------------------------------------------------------------------------- captions
def phrase(o: ShapeObject | Fact) -> str:
    position, shape, color, size = o.fact if isinstance(o, ShapeObject) else o
    return f"a {size} {color} {shape} at the {position}"


def caption(scene: Scene) -> str:
    """'A', 'A and B' or 'A, B and C', lower case, no final period."""
    parts = [phrase(o) for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_PHRASE = (
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(POSITIONS)})"
)
_PHRASE_RE = re.compile(_PHRASE)
_CAPTION_RE = re.compile(rf"{_PHRASE}(?:(?:, {_PHRASE})* and {_PHRASE})?")


def is_well_formed(text: str) -> bool:
    """True when ``text`` follows the caption grammar exactly (any order, any count)."""
    return _CAPTION_RE.fullmatch(text) is not None


def parse_caption(text: str) -> set[Fact]:
    """Read a caption back into its set of (position, shape, color, size).

    Lenient by design: it reads every grammatical object phrase it finds, so a caption with a slip
    elsewhere still scores partial credit in object F1; scene accuracy compares whole sets, so a
    duplicated or missing object still counts as wrong.
    """
    return {(m[3], m[2], m[1], m[0]) for m in _PHRASE_RE.findall(text.lower())}


# ---------------------------------------------------------------------------------------- detector
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
_MIN_AREA = 20  # pixels; a small triangle covers ~85, so anything below is a speck


def _background(pixels: np.ndarray) -> np.ndarray:
    """Objects cover < 40% of the canvas, so the per-channel median is the background."""
    return np.median(pixels.reshape(-1, 3), axis=0)


def _read_quadrant(quad: np.ndarray, bg: np.ndarray) -> tuple[str, str, str] | None:
    """Return (shape, color, size) of the object in a 32x32 quadrant, or None when empty."""
    dist = np.linalg.norm(quad - bg, axis=-1)  # (32, 32)
    rough = dist > 40.0
    if rough.sum() < _MIN_AREA:
        return None
    labels, n = ndimage.label(rough)
    sizes = ndimage.sum(rough, labels, index=range(1, n + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    if blob.sum() < _MIN_AREA:
        return None
    # The object's colour: the blob's core (its pixels farthest from the background).
    core = dist >= np.quantile(dist[blob], 0.5)
    color_rgb = quad[blob & core].mean(axis=0)
    color = list(COLORS)[int(np.argmin(np.linalg.norm(_PALETTE - color_rgb, axis=1)))]
    # Geometry from the half-contrast mask, which a symmetric blur leaves in place.
    level = 0.5 * np.linalg.norm(color_rgb - bg)
    mask = ndimage.binary_fill_holes(ndimage.binary_dilation(blob, iterations=2) & (dist > level))
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    extent = 0.5 * (height + width)  # small ~13 px, large ~23 px
    size = "small" if extent < 18 else "large"
    fill = mask.sum() / float(height * width)  # square ~1.0, circle ~0.79, triangle ~0.5
    if fill > 0.89:
        shape = "square"
    elif fill > 0.64:
        shape = "circle"
    else:
        shape = "triangle"
    return shape, color, size


def detect(image: Image.Image | np.ndarray) -> set[Fact]:
    """Read an image back into its set of (position, shape, color, size), one quadrant at a time."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.shape != (SIZE, SIZE, 3):
        pixels = np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize((SIZE, SIZE)), dtype=np.float32)
    bg = _background(pixels)
    half = SIZE // 2
    facts: set[Fact] = set()
    for position, (qx, qy) in POSITIONS.items():
        x0, y0 = qx - half // 2, qy - half // 2
        found = _read_quadrant(pixels[y0 : y0 + half, x0 : x0 + half], bg)
        if found is not None:
            facts.add((position, *found))
    return facts


# ---------------------------------------------------------------------------------------- measures
@dataclass
class Scores:
    scene_accuracy: float
    object_precision: float
    object_recall: float
    object_f1: float
    attribute_accuracy: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(preds: list[set[Fact]], truths: list[set[Fact]]) -> Scores:
    """Scene accuracy, object precision/recall/F1 and attribute accuracy (shapes-world.md, Measures)."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} truths")
    exact = tp = n_pred = n_true = attr_hits = attr_total = 0
    for pred, truth in zip(preds, truths, strict=True):
        exact += pred == truth
        tp += len(pred & truth)
        n_pred += len(pred)
        n_true += len(truth)
        by_position = {}
        for f in pred:
            by_position.setdefault(f[0], []).append(f)
        for position, shape, color, size in truth:
            if position not in by_position:
                continue
            p = by_position[position][0] if len(by_position[position]) == 1 else None
            for i, value in enumerate((shape, color, size), start=1):
                attr_total += 1
                attr_hits += p is not None and p[i] == value
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Scores(
        scene_accuracy=exact / max(len(truths), 1),
        object_precision=precision,
        object_recall=recall,
        object_f1=f1,
        attribute_accuracy=attr_hits / attr_total if attr_total else 0.0,
        n=len(truths),
    )


# ---------------------------------------------------------------------------------------- splits
SplitName = Literal["train", "val", "test"]
# Share of the scene space each split owns: a scene's hash decides its split, so splits share no scene
# by construction, whatever seeds they are drawn with.
_SPLIT_BUCKETS = {"test": range(0, 5), "val": range(5, 10), "train": range(10, 100)}


def split_of(scene: Scene) -> SplitName:
    bucket = int.from_bytes(hashlib.sha256(scene.key().encode()).digest()[:8], "little") % 100
    return next(name for name, r in _SPLIT_BUCKETS.items() if bucket in r)  # type: ignore[return-value]


def scene_at(seed: int, split: SplitName, index: int) -> Scene:
    """The index-th scene of a split, a pure function of (seed, split, index).

    Each index has its own generator seeded by (seed, split, index), so the seeds of different
    splits never coincide, and a set of size n is a prefix of any larger one. Draws that hash into
    another split are rejected.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        scene = sample_scene(rng)
        if split_of(scene) == split:
            return scene
