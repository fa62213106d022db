"""The report page opened in headless Chromium, and what its structure must be (shared by the page tests)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def chromium(tmp_path):
    """open(page, screenshot=None) -> the page's DOM after load (scripts run), optionally a PNG of it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("VLV_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (VLV_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000"]

    def open_page(page: Path, screenshot: Path | None = None) -> str:
        uri = Path(page).resolve().as_uri()
        dom = subprocess.run([*flags, "--dump-dom", uri], capture_output=True, text=True, timeout=120).stdout
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1280,2400", uri],
                           capture_output=True, timeout=120, check=True)
        return dom

    return open_page


# An absolute path as a reader would see one: a slash not inside a word, then two or more parts.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[\w.+-]+/)+[\w.+-]+")


def visible_text(dom: str) -> str:
    """The page's text and attribute values as a reader meets them, without the embedded image data."""
    dom = re.sub(r'src="data:[^"]*"', "", dom)
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S)
    return re.sub(r"</?[a-zA-Z][^>]*>", " ", dom)


def check_report(dom: str, m: dict, browser: bool = True) -> None:
    """The page's structure: metrics labelled with their n; examples in labelled columns with a mark on each
    drawing and caption, this run's first failures among them when it has any; then the rest, the shipped
    weights' ablations folded away; wall time in minutes with a total; no absolute path anywhere. ``browser``:
    ``dom`` is a browser's after load, so every image must have decoded."""
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    if browser:
        attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
        assert int(attrs["images"]) >= 3 * len(m["examples"]) and attrs["images-loaded"] == attrs["images"], attrs
    assert f"this run, n = {m['n']} {m['settings']['split']} scenes" in dom
    shipped_n = {r[f]["n"] for r, f in ((m["shipped"].get(w, {}), f) for w, f in (
        ("shapes-teacher", "teacher"), ("shapes-stage1", "reconstruction"), ("shapes-stage2", "captions")))
        if f in r}
    if len(shipped_n) == 1:
        assert f"shipped weights, n = {shipped_n.pop()}" in dom

    table = re.search(r'<table id="examples".*?</table>', dom, re.S)
    assert table, "no examples table"
    table = table.group(0)
    headers = re.findall(r"<th[^>]*>(.*?)</th>", re.search(r"<tr>.*?</tr>", table, re.S).group(0), re.S)
    for label in ("scene", "input", "teacher from the true caption", "true caption"):
        assert label in headers, headers
    if "reconstruction" in m:
        assert "reconstruction (this run)" in headers, headers
    if "captions" in m:
        assert "caption predicted (this run)" in headers, headers
    rows = re.findall(r'<tr class="example (pass|fail)" data-scene="(\d+)">(.*?)</tr>', table, re.S)
    assert [int(i) for _, i, _ in rows] == [ex["index"] for ex in m["examples"]]
    assert [kind == "fail" for kind, _, _ in rows] == [ex["failed"] for ex in m["examples"]]
    trained = [p for p in ("reconstruction", "captions") if p in m] or ["teacher"]
    n_failed = len(set().union(*(m["failed_scenes"][p] for p in trained)))
    if n_failed:  # the first failures by scene index are shown, beside successes when there are any
        failing = sorted(set().union(*(m["failed_scenes"][p] for p in trained)))
        shown = [int(i) for kind, i, _ in rows if kind == "fail"]
        assert shown and shown == failing[: len(shown)], (shown, failing)
        assert f"of the {n_failed} scenes" in table
    if n_failed < m["n"]:
        assert any(kind == "pass" for kind, _, _ in rows)
    for kind, _, cells in rows:  # each drawing after the input, and each predicted caption, carries its mark
        marks = len(re.findall(r'class="mark (?:ok|no)"', cells))
        assert marks >= 1 + ("reconstruction" in m) + ("captions" in m), cells[:300]
        if kind == "fail":
            assert 'class="mark no"' in cells

    order = [dom.find(x) for x in ('id="metrics"', 'id="examples"', 'id="timings"')]
    assert -1 not in order and order == sorted(order), order
    details = re.search(r'<details id="shipped-details">.*?</details>', dom, re.S)
    for name in (n for record in m["shipped"].values() for n in record.get("ablations", {})):
        assert details and f'id="ablation-{name}"' in details.group(0)  # folded away, after the run's own
    if m.get("timings"):
        timings = re.search(r'<table id="timings">.*?</table>', dom, re.S).group(0)
        assert "wall minutes" in timings and "total" in timings
        total = sum(m["timings"].values()) / 60
        assert f"{total:.1f}" in timings
    text = visible_text(dom)
    assert not ABSOLUTE_PATH.findall(text), ABSOLUTE_PATH.findall(text)


@pytest.fixture
def report_check():
    """check_report, for the page tests (a fixture: test modules do not import conftest)."""
    return check_report
