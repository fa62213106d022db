import json

from vlv.data.datasets import InMemory
from vlv.data.records import read_records
from vlv.shapes import world as shapes
from vlv.shapes.data import write_shapes


def test_same_seed_same_files(tmp_path):
    a = write_shapes(tmp_path / "a", n=25, seed=3, progress=False)
    b = write_shapes(tmp_path / "b", n=25, seed=3, progress=False)
    for name in ["captions.jsonl"] + [r.image for r in read_records(a)]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    c = write_shapes(tmp_path / "c", n=25, seed=4, progress=False)
    assert (a / "captions.jsonl").read_text() != (c / "captions.jsonl").read_text()


def test_rows_describe_their_images(tmp_path):
    folder = write_shapes(tmp_path / "d", n=12, seed=0, split="val", progress=False)
    data = InMemory.of(folder, size=64)
    for i, img in enumerate(data.images):
        rec = data.read(i)
        s = shapes.Scene.from_json(rec.meta["scene"])
        assert rec.caption == shapes.caption(s) and shapes.detect(img) == s.facts
        assert shapes.split_of(s) == "val"


def test_splits_share_no_scene():
    keys = {split: {shapes.scene_at(0, split, i).key() for i in range(n)}
            for split, n in (("train", 4000), ("val", 400), ("test", 400))}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    # even with the same seed and index, the splits' generators differ
    assert shapes.scene_at(0, "train", 0) != shapes.scene_at(0, "test", 0)


def test_cli_writes_a_folder(tmp_path, cli_run):
    r = cli_run("data", "shapes", "--out", str(tmp_path / "x"), "--n", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "x" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all((tmp_path / "x" / row["image"]).exists() for row in rows)


def test_cli_bad_arguments_print_one_line(tmp_path, cli_run):
    for args in (["--out", str(tmp_path / "y"), "--n", "-3"],
                 ["--out", "/proc/vlv-cannot-write-here", "--n", "3"],
                 ["--out", str(tmp_path / "z"), "--split", "holdout"]):
        r = cli_run("data", "shapes", *args)
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr and "Traceback" not in r.stderr


def test_cli_help(cli_run):
    for cmd in ([], ["data"], ["data", "shapes"], ["teacher", "train"], ["teacher", "sample"], ["demo"],
                ["train", "stage1"], ["train", "lm"], ["train", "stage2"], ["reconstruct"], ["compose"], ["caption"]):
        r = cli_run(*cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout
