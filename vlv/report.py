"""Pictures and pages made from saved results: contact sheets now, the demo report later."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def contact_sheet(images: list[Image.Image], cols: int = 8, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile images on a white sheet, each scaled up by ``scale`` (nearest, so pixels stay exact)."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def save_contact_sheet(folder: Path, out: Path, n: int = 64, cols: int = 8) -> Path:
    """Contact sheet of the first n images of an image-caption folder."""
    from vlv.data import read_records

    records = read_records(folder)[:n]
    images = [Image.open(Path(folder) / r.image) for r in records]
    contact_sheet(images, cols=cols).save(out)
    return out
