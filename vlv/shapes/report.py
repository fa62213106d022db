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
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} td.img{text-align:center;padding:2px;vertical-align:top}
table.ex th,#compositions th{text-align:center} td.img{width:118px} .why{font-size:10px;color:#a00;text-align:left}
img.px{image-rendering:pixelated;width:112px;height:112px;border:1px solid #ccc;display:block;margin:auto}
table.ex td.cap{text-align:left;font-size:12px;width:220px;vertical-align:top}
tr.group th{text-align:left;background:#eef}
tr.fail td.scene{background:#fdd} tr.pass td.scene{background:#dfd}
.mark{font-size:12px;font-weight:bold} .mark.ok{color:#060} .mark.no{color:#a00}
.bad{background:#fdd;color:#a00} .miss{color:#a00;font-style:italic} .ok{color:#060}
svg{background:#fafafa;border:1px solid #ddd;margin:4px}
details{margin-top:32px;border:1px solid #ddd;padding:8px} summary{font-weight:bold;cursor:pointer}
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


def _mark(ok: bool | None) -> str:
    """A pass/fail mark: right means the read-back scene is exactly the true one (what scene accuracy counts)."""
    if ok is None:
        return ""
    return '<span class="mark ok">✓ right</span>' if ok else '<span class="mark no">✗ wrong</span>'


def _why(misread: dict[str, list[str]] | None) -> str:
    """Under a wrong drawing: what the detector saw that the scene lacks, and what it missed."""
    if not misread:
        return ""
    lines = [f'<div class="why">{label}: {html.escape("; ".join(p.removeprefix("a ") for p in misread[key]))}</div>'
             for key, label in (("extra", "saw"), ("missed", "missed")) if misread.get(key)]
    return "".join(lines)


# An absolute path in a recorded command (a temp dir of the machine it ran on) says nothing to a reader.
_ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:[\w.+-]+/)+([\w.+-]+)")


def public(text: str) -> str:
    """A recorded command or note with each absolute path cut to its last part: ``/tmp/d/train`` -> ``…/train``."""
    return _ABSOLUTE.sub(r"…/\1", text)


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


def _n_label(ns: set) -> str:
    return f"n = {ns.pop()}" if len(ns) == 1 else "n per cell"


def _metrics_table(m: dict[str, Any]) -> str:
    """This run's measures beside the shipped weights', each column headed by how many scenes it counts."""
    keys = ("scene_accuracy", "object_f1", "attribute_accuracy")
    rows, ours_n, shipped_n = [], set(), set()
    for key, _ in _ROWS:
        name, field = _SHIPPED_KEYS[key]
        if m.get(key):
            ours_n.add(m[key].get("n", m["n"]))
        shipped = m.get("shipped", {}).get(name, {}).get(field)
        if shipped:
            shipped_n.add(shipped.get("n"))
    for key, label in _ROWS:
        ours = m.get(key)
        name, field = _SHIPPED_KEYS[key]
        shipped = m.get("shipped", {}).get(name, {}).get(field)
        if ours is None and shipped is None:
            continue
        cells = [_pct(ours.get(k)) if ours else "not run" for k in keys]
        cell = _pct(shipped.get("scene_accuracy")) if shipped else "–"
        if shipped and len(shipped_n) > 1:
            cell += f" (n = {shipped.get('n')})"
        cells.append(cell)
        rows.append(f'<tr><td class="l">{label}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    split = html.escape(m["settings"]["split"])
    head = (f'<tr><th class="l" rowspan="2">measure (detector / grammar read-back)</th>'
            f'<th colspan="3" id="n-run">this run, {_n_label(ours_n or {m["n"]})} {split} scenes</th>'
            f'<th id="n-shipped">shipped weights, {_n_label(shipped_n) if shipped_n else "not installed"}</th></tr>'
            '<tr><th>scene acc.</th><th>object F1</th><th>attribute acc.</th><th>scene acc.</th></tr>')
    return f'<table id="metrics">{head}{"".join(rows)}</table>'


# The example table's columns: (header, asset kind or caption key, pass key).
_PICTURES = (("input", "input", None), ("teacher from the true caption", "teacher", "teacher"),
             ("reconstruction (this run)", "recon", "reconstruction"),
             ("reconstruction (shipped weights)", "shipped_recon", "shipped_reconstruction"))
_CAPTIONS = (("caption predicted (this run)", "predicted", "captions"),
             ("caption predicted (shipped weights)", "shipped_predicted", "shipped_captions"))


def _examples_table(m: dict[str, Any], assets: Path) -> list[str]:
    """One row per shown scene, columns labelled: the pictures, the true caption and the predicted ones, each
    drawing and prediction marked right or wrong; the scenes where this run is right, then where it is wrong."""
    examples = m.get("examples", [])
    if not examples:
        return []
    pictures = [c for c in _PICTURES if any((assets / f"{c[1]}_{ex['index']}.png").is_file() for ex in examples)]
    captions = [c for c in _CAPTIONS if any(ex.get(c[1]) is not None for ex in examples)]
    head = ("<tr><th>scene</th>" + "".join(f"<th>{h}</th>" for h, _, _ in pictures)
            + '<th class="l">true caption</th>' + "".join(f'<th class="l">{h}</th>' for h, _, _ in captions) + "</tr>")
    width = 2 + len(pictures) + len(captions)
    failed = m.get("failed_scenes", {})
    parts = [p for p in ("reconstruction", "captions") if p in failed] or ["teacher"]
    n_failed = len(set().union(*(failed[p] for p in parts))) if failed else 0
    what = " or ".join({"reconstruction": "reconstruction", "captions": "caption", "teacher": "teacher drawing"}[p]
                       for p in parts)
    groups = {False: [ex for ex in examples if not ex.get("failed")], True: [ex for ex in examples if ex.get("failed")]}
    body = []
    for is_fail, rows in groups.items():
        if not rows:
            continue
        if not failed:  # an evaluation from before failures were recorded: its first scenes, unsorted
            title = f"The first {len(rows)} scenes (by index)"
        elif is_fail:
            title = (f"Failures: the first {len(rows)} of the {n_failed} scenes (by index) where this run's {what} "
                     "is wrong")
        else:
            title = f"Successes: the first {len(rows)} scenes (by index) where this run's {what} is right"
        body.append(f'<tr class="group"><th colspan="{width}">{html.escape(title)}</th></tr>')
        for ex in rows:
            i, ok = ex["index"], ex.get("passed", {})
            cells = [f'<td class="scene">#{i}</td>']
            for header, kind, key in pictures:
                png = assets / f"{kind}_{i}.png"
                pic = _img(png, f"scene {i}: {header}") if png.is_file() else "–"
                mark = f"{_mark(ok.get(key))}{_why(ex.get('misread', {}).get(key))}" if key else ""
                cells.append(f'<td class="img">{pic}{mark}</td>')
            cells.append(f'<td class="cap">{html.escape(ex["caption"])}</td>')
            for _, field, key in captions:
                pred = ex.get(field)
                text = "–" if pred is None else f"{_mark(ok.get(key))} {_caption_diff(ex['caption'], pred)}"
                cells.append(f'<td class="cap">{text}</td>')
            body.append(f'<tr class="example {"fail" if is_fail else "pass"}" data-scene="{i}">{"".join(cells)}</tr>')
    return ["<h2>Held-out examples</h2><p>Each drawing is read back by the shapes detector and each caption by the "
            "caption grammar: ✓ right when it names exactly the scene's objects (what scene accuracy counts). "
            "In a predicted caption, phrases not in the true one are red.</p>",
            f'<table id="examples" class="ex">{head}{"".join(body)}</table>']


def _compositions(m: dict[str, Any], assets: Path) -> list[str]:
    if not m.get("compositions"):
        return []
    rows = []
    for c in m["compositions"]:
        j = c["index"]
        pics = "".join(f'<td class="img">{_img(assets / f"compose_{j}_{t}.png", t)}</td>' for t in ("a", "b", "mix"))
        rows.append(f"<tr>{pics}<td>{c['k']}</td></tr>")
    head = "<tr><th>image a</th><th>image b</th><th>decoded:<br>first k of a<br>+ first k of b</th><th>k</th></tr>"
    return ["<h2>Composition (paper Fig. 6)</h2>", f'<table id="compositions">{head}{"".join(rows)}</table>']


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
                         f"<p>{html.escape(weights)}: {html.escape(public(ab['note']))}</p>"
                         f'<table id="ablation-{html.escape(name)}"><tr><th class="l">variant</th><th>scene acc.</th>'
                         f"<th>object F1</th><th>steps</th><th>train s</th></tr>{rows}</table>")
    return ["<h3>Ablation benchmarks</h3>", *parts] if parts else []


def _shipped_stage1_curve(m: dict[str, Any]) -> str:
    """The shipped encoder's validation reconstruction accuracy against its cumulative training minutes."""
    curve = m.get("shipped", {}).get("shapes-stage1", {}).get("accuracy_curve")
    if not curve or len(curve["points"]) < 2:
        return ""
    return _svg_curve(curve["points"], "shipped stage 1: val scene accuracy vs training minutes", w=480,
                      x_label="min", svg_id="shipped-stage1-curve")


def _shipped_phases(m: dict[str, Any]) -> list[str]:
    curve = m.get("shipped", {}).get("shapes-stage1", {}).get("accuracy_curve")
    if not curve or not curve.get("phases"):
        return []
    phases = "".join(f"<li>{p['steps']} steps, {p['minutes']} min: <code>{html.escape(public(p['command'] or ''))}"
                     "</code>" + (f" ({html.escape(public(p['note']))})" if p.get("note") else "") + "</li>"
                     for p in curve["phases"])
    return ["<h3>How the shipped stage 1 was trained</h3><p>Phases, oldest first, each after the first warm-started "
            "from the one before (minutes are wall time on the device each names):</p>", f"<ol>{phases}</ol>"]


def _curves(m: dict[str, Any]) -> list[str]:
    parts = [_svg_curve(points, f"{stage} loss") for stage, points in m.get("curves", {}).items()]
    shipped = _shipped_stage1_curve(m)
    if shipped:
        parts.append(shipped)
    return ["<h2>Training curves</h2>", *parts] if parts else []


def _timings_table(m: dict[str, Any]) -> str:
    timings = m.get("timings", {})
    if not timings:
        return "<p>no timings recorded</p>"
    rows = "".join(f'<tr><td class="l">{html.escape(k)}</td><td>{v / 60:.1f}</td></tr>' for k, v in timings.items())
    total = f'<tr><th class="l">total</th><th>{sum(timings.values()) / 60:.1f}</th></tr>'
    return f'<table id="timings"><tr><th class="l">part</th><th>wall minutes</th></tr>{rows}{total}</table>'


def _provenance(m: dict[str, Any]) -> str:
    """Whether this run's numbers are reproducible: fixed steps are; a time budget's depend on the machine."""
    recipe = html.escape(str(m.get("recipe", "?")))
    if m.get("teacher_name", "shapes-teacher") != "shapes-teacher":  # the shipped column's chain is the UNet's
        recipe += f"</b> distilling the teacher <b>{html.escape(str(m['teacher_name']))}"
    if m.get("budget_minutes"):
        return (f'<p id="provenance" class="bad">Recipe <b>{recipe}</b> on a {m["budget_minutes"]:g}-minute budget: '
                "each stage fitted its step count to this machine's pace, so these numbers are "
                "<b>machine-dependent</b> (a slower machine trains less).</p>")
    return (f'<p id="provenance">Recipe <b>{recipe}</b>: fixed step counts, seeded: the same on a re-run here; '
            "on another machine floating-point differences can move them slightly.</p>")


def build_report(folder: Path) -> Path:
    """folder/metrics.json + folder/report/*.png -> folder/report.html (self-contained)."""
    folder = Path(folder)
    m = json.loads((folder / "metrics.json").read_text())
    assets = folder / "report"
    s = m["settings"]
    name = html.escape(str(m.get("run", folder.resolve().name)))
    shipped_parts = [*_ablation_tables(m), *_shipped_phases(m)]
    parts = [f"<h1>VLV run: {name}</h1>",
             f"<p>{m['n']} held-out <b>{html.escape(s['split'])}</b> scenes; sampler {s['sampler']}, "
             f"CFG {s['guidance_scale']}; captions with {s['num_beams']} beam(s). "
             "Images are read back by the shapes detector, captions by the caption grammar.</p>",
             _provenance(m), "<h2>Metrics</h2>", _metrics_table(m), *_examples_table(m, assets),
             *_compositions(m, assets), *_curves(m), "<h2>Wall time</h2>",
             "<p>Each part of the run, as it recorded them.</p>", _timings_table(m)]
    if shipped_parts:
        parts += ['<details id="shipped-details"><summary>About the shipped weights: ablation benchmarks and how '
                  "they were trained</summary>", *shipped_parts, "</details>"]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>VLV report: {name}'
            f'</title><style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{"".join(parts)}</body></html>\n')
    out = folder / REPORT_FILE
    atomic_write_text(out, page)
    return out
