"""``report.html`` beside ``metrics.json``: the numbers, read from the metrics as written, and a grid of examples
(originals, reconstructions, renders from captions, the captions), one self-contained file with thumbnails embedded
as data URIs, so it can be mailed or moved alone."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlv.data.images import open_image
from vlv.errors import BadImage
from vlv.modeling import atomic_write_text

REPORT_FILE = "report.html"
# The measures, in the order the page shows them.
SCORE_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "meteor", "spice", "clipscore", "refclipscore",
              "fid", "kid", "kid_std", "clip_i", "n", "paired")
THUMBNAIL = 192

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h2{margin-top:28px;border-bottom:1px solid #ddd} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f4f4f4} td.l,th.l{text-align:left}
figure{display:inline-block;margin:2px;vertical-align:top;text-align:center;font-size:11px}
figure img{max-width:192px;max-height:192px;border:1px solid #ccc;display:block}
.ex{border-bottom:1px solid #eee;padding:6px 0} .txt{font-size:13px;max-width:900px} .miss{color:#a00}
"""


@dataclass
class Example:
    """One row of the grid: images (label, file) and texts (label, text)."""

    name: str
    images: list[tuple[str, Path]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)


def thumbnail(path: Path, size: int = THUMBNAIL) -> str:
    """A PNG data URI of the image, at most ``size`` pixels a side (small images are scaled up, pixels kept)."""
    im = open_image(path)
    scale = size / max(im.size)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((w, h), Image.NEAREST if scale > 1 else Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _score_rows(metrics: dict[str, Any], label: str = "all") -> list[tuple[str, dict[str, Any]]]:
    """(row label, scores) of the top level and of each nested block that holds scores (captions, per CFG)."""
    rows = []
    own = {k: metrics[k] for k in SCORE_KEYS if isinstance(metrics.get(k), int | float)}
    if own:
        rows.append((label, own))
    for key, value in metrics.items():
        if isinstance(value, dict) and key == "by_cfg":
            rows += [row for g, block in value.items() for row in _score_rows(block, f"CFG {g}")]
        elif isinstance(value, dict) and key != "settings":
            rows += _score_rows(value, key)
    return rows


def _scores_table(metrics: dict[str, Any]) -> str:
    rows = _score_rows(metrics)
    if not rows:
        return "<p>no scores</p>"
    keys = [k for k in SCORE_KEYS if any(k in r for _, r in rows)]
    head = '<tr><th class="l">set</th>' + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    body = "".join(f'<tr><td class="l">{html.escape(label)}</td>'
                   + "".join(f"<td>{_number(r[k]) if k in r else '–'}</td>" for k in keys) + "</tr>"
                   for label, r in rows)
    return f'<table id="scores">{head}{body}</table>'


def _settings(metrics: dict[str, Any]) -> str:
    items = {**metrics.get("settings", {}), **{k: v for k, v in metrics.items()
                                                if isinstance(v, str) and k != "title"}}
    lis = "".join(f"<li><b>{html.escape(k)}</b>: {_number(v)}</li>" for k, v in items.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in metrics.get("notes", []))
    return f"<ul>{lis}</ul>" + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else "")


def _example(ex: Example) -> str:
    figs = []
    for label, path in ex.images:
        try:
            src = thumbnail(path)
        except BadImage:
            figs.append(f'<figure class="miss">{html.escape(label)}: missing</figure>')
            continue
        t = html.escape(label)
        figs.append(f'<figure><img src="{src}" alt="{t}" title="{t}"><figcaption>{t}</figcaption></figure>')
    texts = "".join(f"<div><b>{html.escape(label)}:</b> {html.escape(text)}</div>" for label, text in ex.texts)
    name = f"<div><code>{html.escape(ex.name)}</code></div>"
    return f'<div class="ex">{name}{"".join(figs)}<div class="txt">{texts}</div></div>'


def write_report(out: Path, title: str, metrics: dict[str, Any], examples: list[Example]) -> Path:
    """out/report.html from the metrics (as written to out/metrics.json) and the examples."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Scores</h2>", _scores_table(metrics), "<h2>How</h2>",
             _settings(metrics)]
    if examples:
        parts += ["<h2>Examples</h2>", *map(_example, examples)]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body>{"".join(parts)}</body></html>\n')
    path = Path(out) / REPORT_FILE
    atomic_write_text(path, page)
    return path
