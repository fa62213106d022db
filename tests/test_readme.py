"""README's results quote the results file beside the shipped weights, which quotes their metrics.json: the
numbers a reader sees cannot drift from the measured ones."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
WEIGHTS = ROOT / "vlv" / "weights"
README_ROWS = {"teacher from the true captions": ("shapes-teacher", "teacher"),
               "reconstruction: image -> z -> teacher (`shapes-stage1`)": ("shapes-stage1", "reconstruction"),
               "captions: image -> z -> LLM (`shapes-stage2`)": ("shapes-stage2", "captions"),
               "caption -> teacher (`shapes-stage2`)": ("shapes-stage2", "caption_to_image")}


def _metrics(name: str) -> dict:
    path = WEIGHTS / name / "metrics.json"
    if not path.is_file():
        pytest.skip(f"{name} not shipped in this checkout")
    return json.loads(path.read_text())


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_readme_results_table_quotes_the_shipped_metrics():
    rows = {r[0]: r[1] for r in _rows((ROOT / "README.md").read_text()) if r[0] in README_ROWS}
    assert set(rows) == set(README_ROWS)
    for label, (name, key) in README_ROWS.items():
        assert rows[label] == f"{100 * _metrics(name)[key]['scene_accuracy']:.1f}%", label


def test_the_results_file_quotes_metrics_json():
    checked = 0
    for row in _rows((WEIGHTS / "README.md").read_text()):
        source = re.fullmatch(r"`([\w-]+)/metrics\.json` `(\w+)`", row[-1])
        if not source:
            continue
        m = _metrics(source[1])[source[2]]
        assert row[1] == f"{100 * m['scene_accuracy']:.1f}%" and row[2] == f"{m['object_f1']:.3f}", row
        checked += 1
    assert checked == 6


def _command_lines(text: str) -> list[list[str]]:
    """Every vlv command in README's code blocks, as argv (continuations joined, comments and prompts cut)."""
    import shlex

    lines, out = [], []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line.removeprefix("$ ")).strip()
        if "..." in line or "<" in line:
            continue  # an elided or templated line
        words = shlex.split(line)
        if words[:1] == ["vlv"]:
            out.append(words[1:])
        elif "vlv.cli" in words:
            out.append(words[words.index("vlv.cli") + 1:])
    return out


def test_every_vlv_command_readme_shows_parses(tmp_path, monkeypatch):
    """A researcher copies README's commands as written: each names flags and values the CLI takes."""
    from vlv.cli import build_parser

    monkeypatch.chdir(tmp_path)  # --out paths are checked for writability, relative to here
    commands = _command_lines((ROOT / "README.md").read_text())
    assert len(commands) > 30
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: `vlv {' '.join(argv)}` does not parse")
