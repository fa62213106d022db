"""Pictures and pages made from saved results: contact sheets, and a run's report page.

The report is generated from ``metrics.json`` and the PNGs beside it (``vlv.shapes.evaluate`` writes both), never
from numbers typed in: one self-contained HTML file with the images embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from vlv.errors import InvalidInput
from vlv.modeling import atomic_write_text

REPORT_FILE = "report.html"


def contact_sheet(images: list[Image.Image], cols: int = 8, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile images on a white sheet, each scaled up by ``scale`` (nearest, so pixels stay exact)."""
    if not images:
        raise InvalidInput("no images to tile")
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
    from vlv.data.images import open_image
    from vlv.data.records import read_records

    records = read_records(folder)[:n]
    images = [open_image(Path(folder) / r.image) for r in records]  # a bad file names itself
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    contact_sheet(images, cols=cols).save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


# -------------------------------------------------------------------------------------- the page
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
img.px{image-rendering:pixelated;width:128px;height:128px;border:1px solid #ccc}
.ex{display:inline-block;margin:6px;vertical-align:top;width:540px;font-size:12px}
.bad{background:#fdd;color:#a00} .miss{color:#a00;font-style:italic} .ok{color:#060}
svg{background:#fafafa;border:1px solid #ddd;margin:4px}
"""

# Sets data attributes the headless-browser test reads: how many images decoded, how many tables.
_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.tables = document.querySelectorAll('table').length;
});
"""


def _img(path: Path, title: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    t = html.escape(title)
    return f'<img class="px" src="data:image/png;base64,{data}" title="{t}" alt="{t}">'


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _phrases(caption: str) -> list[str]:
    return [p for p in re.split(r", | and ", caption) if p]


def _caption_diff(true: str, pred: str) -> str:
    """The predicted caption with each object phrase absent from the truth marked, then the missed ones."""
    truth = set(_phrases(true))
    parts = [f'<span class="{"ok" if p in truth else "bad"}">{html.escape(p)}</span>' for p in _phrases(pred)]
    missed = [html.escape(p) for p in _phrases(true) if p not in set(_phrases(pred))]
    tail = f' <span class="miss">missed: {"; ".join(missed)}</span>' if missed else ""
    return ", ".join(parts) + tail


def _svg_curve(points: list[list[float]], title: str, w: int = 360, h: int = 200, x_label: str = "step",
               svg_id: str | None = None) -> str:
    if len(points) < 2:
        return f"<p>{html.escape(title)}: too few points to plot</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: 40 + (w - 50) * (x - x0) / max(x1 - x0, 1e-9)  # noqa: E731
    sy = lambda y: h - 25 - (h - 45) * (y - y0) / max(y1 - y0, 1e-9)  # noqa: E731
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    ident = f' id="{svg_id}"' if svg_id else ""
    return (f'<svg{ident} width="{w}" height="{h}" role="img"><title>{html.escape(title)}</title>'
            f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>'
            f'<text x="4" y="{sy(y1) + 4:.0f}" font-size="10">{y1:.3g}</text>'
            f'<text x="4" y="{sy(y0):.0f}" font-size="10">{y0:.3g}</text>'
            f'<text x="40" y="{h - 8}" font-size="10">{html.escape(x_label)} {x0:g}</text>'
            f'<text x="{w - 10}" y="{h - 8}" font-size="10" text-anchor="end">{x1:g}</text></svg>')


_ROWS = [("teacher", "teacher from the true captions"), ("reconstruction", "reconstruction: image → z → teacher"),
         ("captions", "captions: image → z → LLM"), ("caption_to_image", "caption → teacher (Table 1 analogue)")]
_SHIPPED_KEYS = {"teacher": ("shapes-teacher", "teacher"), "reconstruction": ("shapes-stage1", "reconstruction"),
                 "captions": ("shapes-stage2", "captions"), "caption_to_image": ("shapes-stage2", "caption_to_image")}


def _metrics_table(m: dict[str, Any]) -> str:
    rows = []
    for key, label in _ROWS:
        ours = m.get(key)
        name, field = _SHIPPED_KEYS[key]
        shipped = m.get("shipped", {}).get(name, {}).get(field)
        if ours is None and shipped is None:
            continue
        keys = ("scene_accuracy", "object_f1", "attribute_accuracy")
        cells = [_pct(ours.get(k)) if ours else "not run" for k in keys]
        cells.append(_pct(shipped.get("scene_accuracy")) if shipped else "–")
        rows.append(f'<tr><td class="l">{label}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ('<tr><th class="l">measure (detector / grammar read-back)</th><th>scene acc.</th><th>object F1</th>'
            '<th>attribute acc.</th><th>shipped weights: scene acc.</th></tr>')
    return f'<table id="metrics">{head}{"".join(rows)}</table>'


_ABLATION_TITLES = {"levels": "Trainable levels of stage 2 (paper Table 4, right)",
                    "table7": "Stage 2 on the stage-1 encoder vs an untrained one (paper Table 7)",
                    "lora-lr": "LoRA adapters in the LLM at a higher learning rate",
                    "nq": "Number of queries Nq, warm-started from the shipped encoder's first Nq queries",
                    "nq-scratch": "Number of queries Nq, from scratch (paper Table 4, left)"}


def _ablation_tables(m: dict[str, Any]) -> list[str]:
    """The benchmarks recorded beside the shipped weights (``scripts/ship.py ablation``), one table each."""
    parts = []
    for weights, record in m.get("shipped", {}).items():
        for name, ab in record.get("ablations", {}).items():
            rows = "".join(
                f'<tr><td class="l">{html.escape(variant)}</td><td>{_pct(r.get("scene_accuracy"))}</td>'
                f'<td>{_pct(r.get("object_f1"))}</td><td>{r.get("steps", "–")}</td>'
                f'<td>{r.get("train_s", "–")}</td></tr>'
                for variant, r in ab["results"].items())
            parts.append(f"<h3>{html.escape(_ABLATION_TITLES.get(name, name))}</h3>"
                         f"<p>{html.escape(weights)}: {html.escape(ab['note'])}</p>"
                         f'<table id="ablation-{html.escape(name)}"><tr><th class="l">variant</th><th>scene acc.</th>'
                         f"<th>object F1</th><th>steps</th><th>train s</th></tr>{rows}</table>")
    return ["<h2>Ablations (benchmarks of the shipped weights)</h2>", *parts] if parts else []


def _shipped_stage1_curve(m: dict[str, Any]) -> list[str]:
    """The shipped encoder's validation reconstruction accuracy against its cumulative training minutes."""
    curve = m.get("shipped", {}).get("shapes-stage1", {}).get("accuracy_curve")
    if not curve or len(curve["points"]) < 2:
        return []
    phases = "".join(f"<li>{p['steps']} steps, {p['minutes']} min: <code>{html.escape(p['command'] or '')}</code>"
                     + (f" ({html.escape(p['note'])})" if p.get("note") else "") + "</li>" for p in curve["phases"])
    return ["<h2>Shipped stage 1: reconstruction accuracy against training time</h2>",
            _svg_curve(curve["points"], "val scene accuracy vs minutes", w=480, x_label="min",
                       svg_id="shipped-stage1-curve"),
            "<p>Phases, oldest first, each after the first warm-started from the one before (minutes are wall "
            f"time on the device each names):</p><ol>{phases}</ol>"]


def _timings_table(m: dict[str, Any]) -> str:
    timings = m.get("timings", {})
    if not timings:
        return "<p>no timings recorded</p>"
    rows = "".join(f'<tr><td class="l">{html.escape(k)}</td><td>{v:.1f}</td></tr>' for k, v in timings.items())
    return f'<table id="timings"><tr><th class="l">stage</th><th>wall s</th></tr>{rows}</table>'


def _provenance(m: dict[str, Any]) -> str:
    """Whether this run's numbers are reproducible: fixed steps are; a time budget's depend on the machine."""
    recipe = html.escape(str(m.get("recipe", "?")))
    if m.get("budget_minutes"):
        return (f'<p id="provenance" class="bad">Recipe <b>{recipe}</b> on a {m["budget_minutes"]:g}-minute budget: '
                "each stage fitted its step count to this machine's pace, so these numbers are "
                "<b>machine-dependent</b> (a slower machine trains less).</p>")
    return (f'<p id="provenance">Recipe <b>{recipe}</b>: fixed step counts, seeded, so these numbers are the '
            "same on any machine.</p>")


def build_report(run: Path) -> Path:
    """run/metrics.json + run/report/*.png -> run/report.html (self-contained)."""
    run = Path(run)
    m = json.loads((run / "metrics.json").read_text())
    assets = run / "report"
    s = m["settings"]
    parts = [f"<h1>VLV run: {html.escape(run.name)}</h1>",
             f"<p>{m['n']} held-out <b>{html.escape(s['split'])}</b> scenes; sampler {s['sampler']}, "
             f"CFG {s['guidance_scale']}; captions with {s['num_beams']} beam(s). "
             "Images are read back by the shapes detector, captions by the caption grammar.</p>",
             _provenance(m), "<h2>Metrics</h2>", _metrics_table(m), *_ablation_tables(m),
             "<h2>Wall time</h2>", _timings_table(m),
             "<h2>Held-out examples</h2><p>input · teacher from the true caption · reconstruction from this "
             "run's VLV embeddings · reconstruction by the shipped, fully trained encoder; the true caption, "
             "this run's caption and the shipped captioner's (wrong phrases in red).</p>"]
    for ex in m.get("examples", []):
        i = ex["index"]
        pics = [_img(assets / f"{kind}_{i}.png", kind.replace("_", " ")) for kind in
                ("input", "teacher", "recon", "shipped_recon") if (assets / f"{kind}_{i}.png").is_file()]
        text = f"<div><b>true:</b> {html.escape(ex['caption'])}</div>"
        for key, label in (("predicted", "this run"), ("shipped_predicted", "shipped")):
            if ex.get(key) is not None:
                text += f"<div><b>{label}:</b> {_caption_diff(ex['caption'], ex[key])}</div>"
        parts.append(f'<div class="ex">{"".join(pics)}{text}</div>')
    if m.get("compositions"):
        parts.append("<h2>Composition (paper Fig. 6)</h2><p>image a · image b · the first k embeddings of each, "
                     "decoded together.</p>")
        for c in m["compositions"]:
            j = c["index"]
            pics = "".join(_img(assets / f"compose_{j}_{t}.png", t) for t in ("a", "b", "mix"))
            parts.append(f'<div class="ex">{pics}<div>k = {c["k"]} of each</div></div>')
    if m.get("curves"):
        parts.append("<h2>Training loss</h2>")
        parts += [_svg_curve(points, f"{stage} loss") for stage, points in m["curves"].items()]
    parts += _shipped_stage1_curve(m)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>VLV report: {html.escape(run.name)}'
            f'</title><style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{"".join(parts)}</body></html>\n')
    out = run / REPORT_FILE
    atomic_write_text(out, page)
    return out
