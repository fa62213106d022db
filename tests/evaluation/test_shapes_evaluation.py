"""The shapes world runs the real-data commands (issue 32, item 5): `vlv caption` with the shipped captioner, then
`vlv evaluate captions` against the true captions, `vlv evaluate reconstruction` and the Table 1 protocol
`vlv evaluate caption-to-image` through the shipped teacher, FID from a TorchScript stand-in of the Inception file.
"""

import json

import numpy as np
import pytest
from PIL import Image

from vlv.cli import main

pytestmark = pytest.mark.slow  # the shipped weights on data
pytest.importorskip("pycocoevalcap")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vlv.shapes.data import write_shapes

    return write_shapes(tmp_path_factory.mktemp("eval") / "scenes", n=4, seed=0, split="val", progress=False)


def _run(*args) -> None:
    assert main([str(a) for a in args]) == 0


def test_caption_metrics_of_the_shipped_captioner(scenes, tmp_path):
    _run("caption", scenes, "--out", tmp_path / "pred.jsonl")
    _run("evaluate", "captions", tmp_path / "pred.jsonl", "--refs", scenes / "captions.jsonl", "--out",
         tmp_path / "m", "--no-java")
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    # the same captions, each given to another image: the metric must tell them apart
    rows = [json.loads(r) for r in (tmp_path / "pred.jsonl").read_text().splitlines()]
    shifted = [{"image": r["image"], "caption": rows[(i + 1) % len(rows)]["caption"]} for i, r in enumerate(rows)]
    (tmp_path / "shifted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shifted))
    _run("evaluate", "captions", tmp_path / "shifted.jsonl", "--refs", scenes / "captions.jsonl", "--out",
         tmp_path / "s", "--no-java")
    s = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["n"] == 4 and m["cider"] > 2 * s["cider"] and m["bleu4"] > s["bleu4"]


def test_reconstruction_fid_with_a_stand_in_network(scenes, tmp_path, standin_inception):
    _run("evaluate", "reconstruction", scenes, "--encoder", "shapes-stage1", "--decoder", "shapes-teacher",
         "--inception", standin_inception, "--out", tmp_path / "r", "--sampler", "fast", "--steps", "5")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["by_cfg"]["2"]
    assert m["paired"] == 4 and np.isfinite(m["fid"]) and m["fid"] >= 0
    assert sorted(p.name for p in (tmp_path / "r" / "reconstructions" / "cfg-2").iterdir()) == [
        f"00000{i}.png" for i in range(4)]
    # noise in place of the reconstructions is measured as further from the originals
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(noise / f"00000{i}.png")
    _run("evaluate", "images", noise, scenes, "--inception", standin_inception, "--out", tmp_path / "n",
         "--crop", "center")
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["fid"] > m["fid"]


def test_table1_protocol_end_to_end_and_resumed(scenes, tmp_path, standin_inception, capsys):
    args = ("evaluate", "caption-to-image", scenes, "--model", "shapes-stage2", "--pipeline", "shapes-teacher",
            "--inception", standin_inception, "--out", tmp_path / "t1", "--cfg", "1", "2", "--steps", "4",
            "--refs", scenes / "captions.jsonl", "--no-java")
    _run(*args)
    out = tmp_path / "t1"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["by_cfg"]) == {"1", "2"} and all(r["paired"] == 4 for r in m["by_cfg"].values())
    assert m["captions"]["cider"] > 0 and m["settings"]["steps"] == 4
    renders = sorted((out / "renders").rglob("*.png"))
    assert len(renders) == 8 and len((out / "captions.jsonl").read_text().splitlines()) == 4
    page = (out / "report.html").read_text()
    assert page.count("<img") == 4 * 3 and "Table 1" in page  # original + two renders per image

    # a killed run is resumed: only what is missing is made
    stamps = {p: p.stat().st_mtime_ns for p in renders}
    lost = out / "renders" / "cfg-2" / "000001.png"
    lost.unlink()
    rows = (out / "captions.jsonl").read_text().splitlines()
    (out / "captions.jsonl").write_text("\n".join(rows[:3]) + "\n")
    _run(*args)
    assert lost.is_file() and len((out / "captions.jsonl").read_text().splitlines()) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != lost)
    again = json.loads((out / "metrics.json").read_text())
    assert again["by_cfg"]["1"] == m["by_cfg"]["1"]  # nothing of CFG 1 was remade

    # outputs made with other settings are never mixed in
    steps = args.index("--steps") + 1
    assert main([str(a) for a in (*args[:steps], 3, *args[steps + 1:])]) == 2
    assert "steps 4 -> 3" in capsys.readouterr().err


@pytest.mark.dist
def test_table1_protocol_under_torchrun_equals_one_process(scenes, tmp_path, standin_inception):
    """Two CPU processes share the captions and the renders (image i seeded seed + i); the main one measures."""
    import subprocess
    import sys

    def args(out):
        return ["evaluate", "caption-to-image", str(scenes), "--model", "shapes-stage2", "--pipeline",
                "shapes-teacher", "--inception", str(standin_inception), "--out", str(out), "--cfg", "2",
                "--steps", "2", "--batch-size", "1", "--quiet"]

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "vlv.cli", *args(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # one process reports
    _run(*args(tmp_path / "one"))
    two, one = tmp_path / "two", tmp_path / "one"
    assert (two / "captions.jsonl").read_text() == (one / "captions.jsonl").read_text()
    for p in sorted((one / "renders" / "cfg-2").iterdir()):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(two / "renders" / "cfg-2" / p.name)))
    m2, m1 = (json.loads((d / "metrics.json").read_text())["by_cfg"]["2"] for d in (two, one))
    assert m2["paired"] == 4 and m2["fid"] == pytest.approx(m1["fid"], rel=1e-6)
