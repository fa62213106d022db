"""What the inference commands write: a re-run replaces a file output atomically, names stay unique and
traceable, and a run over many images stopped part-way resumes where it stopped (and splits over ranks).

In-process (``vlv.cli.main`` and the library jobs) on the shipped shapes weights: seconds each.
"""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from vlv.cli import main
from vlv.data.outputs import Partial, name_inputs

WORKER = Path(__file__).with_name("dist_outputs_worker.py")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.replace("\r\n", "\n")
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    shown = [line for line in shown if line.strip()]
    assert len(shown) == 1, err
    return shown[0]


@pytest.fixture
def scenes(tmp_path):
    from vlv.shapes.data import write_shapes

    return write_shapes(tmp_path / "scenes", n=5, seed=0, split="val", progress=False)


def test_every_file_output_command_runs_twice(tmp_path, scenes):
    """Each command whose --out is a file runs again onto its own output and replaces it by a rename (a new inode:
    never truncated and rewritten in place), leaving no partial or temp file beside it."""
    out, a, b = tmp_path / "out", str(scenes / "000000.png"), str(scenes / "000001.png")
    models = ["--encoder", "shapes-stage1", "--decoder", "shapes-teacher"]
    commands = {"c.jsonl": ["caption", a, b],
                "z.safetensors": ["embed", a, b, *models],
                "ab.png": ["compose", a, b, *models, "--steps", "2"],
                "t.png": ["teacher", "sample", "shapes-teacher", "--prompt", "a red circle", "--steps", "2"],
                "sheet.png": ["data", "sheet", str(scenes)]}
    for name, argv in commands.items():
        target = out / name
        assert main([*argv, "--out", str(target)]) == 0, argv
        first = target.read_bytes(), target.stat().st_ino
        if target.suffix == ".safetensors":
            shutil.copy(target, out / "first.st")
        assert main([*argv, "--out", str(target)]) == 0, argv
        assert target.stat().st_ino != first[1], name  # replaced by a rename
        if target.suffix == ".safetensors":  # its header's order is a hash map's: compare what it holds
            again, before = load_file(target), load_file(out / "first.st")
            assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)
        else:
            assert target.read_bytes() == first[0], name  # the same inputs give the same file
    assert sorted(p.name for p in out.iterdir()) == sorted([*commands, "first.st"])


def test_names_are_relative_to_the_input_root(tmp_path, scenes, capsys):
    """Same-named images from two folders stay apart in caption rows, embed metadata and reconstruct's tree."""
    for sub, k in (("val", 0), ("test", 1), ("val/deep", 2)):
        (tmp_path / "in" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(scenes / f"00000{k}.png", tmp_path / "in" / sub / "x.png")
    val, test, deep = (tmp_path / "in" / s for s in ("val", "test", "val/deep"))
    inputs = name_inputs([val, test, deep / "x.png"])
    assert inputs.names == ["val/x.png", "test/x.png", "val/deep/x.png"] and inputs.root == tmp_path / "in"
    assert name_inputs([val]).names == ["x.png"]  # one folder: names as its own captions.jsonl would give them

    assert main(["caption", str(val), str(test), "--out", str(tmp_path / "c.jsonl")]) == 0
    rows = [json.loads(r) for r in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["val/x.png", "test/x.png"] and rows[0]["caption"] != rows[1]["caption"]
    assert main(["embed", str(val), str(test), "--encoder", "shapes-stage1", "--out", str(tmp_path / "z.st")]) == 0
    with safe_open(tmp_path / "z.st", framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["images"]) == ["val/x.png", "test/x.png"] and meta["root"] == str(tmp_path / "in")
    assert main(["reconstruct", str(val), str(test), str(deep), "--encoder", "shapes-stage1", "--decoder",
                 "shapes-teacher", "--steps", "1", "--out", str(tmp_path / "rec")]) == 0
    made = sorted(p.relative_to(tmp_path / "rec").as_posix() for p in (tmp_path / "rec").rglob("*") if p.is_file())
    assert made == ["test/x.png", "val/deep/x.png", "val/x.png"]
    capsys.readouterr()


def test_colliding_or_overwriting_outputs_are_refused_before_any_work(tmp_path, scenes, capsys):
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(scenes / "000000.png", both / "a.png")
    Image.open(scenes / "000001.png").save(both / "a.jpg")
    rec = ["--encoder", "shapes-stage1", "--decoder", "shapes-teacher", "--out"]
    cases = [(["reconstruct", str(both), *rec, str(tmp_path / "rec")], "a.png", tmp_path / "rec"),
             (["reconstruct", str(scenes), *rec, str(scenes)], "would overwrite the input", None),
             (["caption", str(scenes), str(scenes / "000000.png"), "--out", str(tmp_path / "c.jsonl")], "given twice",
              tmp_path / "c.jsonl"),
             (["compose", str(scenes / "000000.png"), str(scenes / "000001.png"), *rec, str(scenes / "000001.png")],
              "one of the input images", None)]
    for argv, named, made in cases:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(argv) == 2, argv
        err = _one_line(capsys)
        assert named in err, err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before and (made is None or not made.exists())


class _Stop(KeyboardInterrupt):
    """The injected interruption: what a Ctrl-C in the middle of a batch raises."""


def _interrupt_after(monkeypatch, name: str, calls: int) -> list[int]:
    """Let ``calls`` batches through ``vlv.inference.<name>``, then stop the job; returns the batch sizes seen."""
    import vlv.inference

    real, seen = getattr(vlv.inference, name), []

    def wrapped(model, *args, **kwargs):
        x = args[-1] if name == "reconstruct_images" else args[0]
        if len(seen) == calls:
            raise _Stop
        seen.append(len(x))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(vlv.inference, name, wrapped)
    return seen


def test_caption_resumes_where_it_stopped(tmp_path, scenes, monkeypatch, capsys):
    """Rows land per batch in c.jsonl.partial/; a re-run of the same inputs captions only the rest and writes the
    same file an uninterrupted run writes; other settings start over; a finished run leaves no partial folder."""
    from vlv.inference import caption_files

    full = tmp_path / "full.jsonl"
    caption_files([scenes], full, batch_size=2)
    out, partial = tmp_path / "c.jsonl", tmp_path / "c.jsonl.partial"
    with monkeypatch.context() as m:
        _interrupt_after(m, "caption_images", 2)
        with pytest.raises(_Stop):
            caption_files([scenes], out, batch_size=2)
    assert not out.exists() and len(list(partial.glob("*.jsonl"))) == 2
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "caption_images", 99)
        assert caption_files([scenes], out, batch_size=2) == 5
    assert seen == [1]  # only the fifth image was left
    assert "resuming: 4 of 5 image(s) done" in capsys.readouterr().out
    assert out.read_text() == full.read_text() and not partial.exists()
    # a partial folder of other settings is thrown away, not mixed in
    with monkeypatch.context() as m:
        _interrupt_after(m, "caption_images", 1)
        with pytest.raises(_Stop):
            caption_files([scenes], out, batch_size=2, num_beams=1)
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "caption_images", 99)
        caption_files([scenes], out, batch_size=2)
    assert seen == [2, 2, 1] and "starting over" in capsys.readouterr().out
    assert out.read_text() == full.read_text() and not partial.exists()


def test_embed_and_reconstruct_resume_to_the_uninterrupted_result(tmp_path, scenes, monkeypatch):
    from vlv.inference import embed_files, reconstruct_files

    embed_files([scenes], tmp_path / "full.st", "shapes-stage1", "shapes-teacher", batch_size=2)
    with monkeypatch.context() as m:
        _interrupt_after(m, "embed_images", 1)
        with pytest.raises(_Stop):
            embed_files([scenes], tmp_path / "z.st", "shapes-stage1", "shapes-teacher", batch_size=2)
    assert len(list((tmp_path / "z.st.partial").glob("*.safetensors"))) == 1
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "embed_images", 99)
        embed_files([scenes], tmp_path / "z.st", "shapes-stage1", "shapes-teacher", batch_size=2)
    assert seen == [2, 1]
    full, resumed = load_file(tmp_path / "full.st"), load_file(tmp_path / "z.st")
    assert full.keys() == resumed.keys() == {"z", "T_z"}
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)

    kw = {"batch_size": 2, "steps": 2}
    reconstruct_files([scenes], tmp_path / "rec-full", "shapes-stage1", "shapes-teacher", **kw)
    with monkeypatch.context() as m:
        _interrupt_after(m, "reconstruct_images", 1)
        with pytest.raises(_Stop):
            reconstruct_files([scenes], tmp_path / "rec", "shapes-stage1", "shapes-teacher", **kw)
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "reconstruct_images", 99)
        reconstruct_files([scenes], tmp_path / "rec", "shapes-stage1", "shapes-teacher", **kw)
    assert seen == [2, 1]
    names = sorted(p.name for p in (tmp_path / "rec-full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "rec").iterdir()) and len(names) == 5  # no .partial left
    for n in names:  # each batch seeded by its offset: the resumed batches draw what the full run drew
        assert np.array_equal(np.asarray(Image.open(tmp_path / "rec" / n)),
                              np.asarray(Image.open(tmp_path / "rec-full" / n))), n


class _Rank:
    """accelerate's process state as the jobs use it, for one of W threads."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self._barrier = rank, world, barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=30)


def test_ranks_take_disjoint_shares_and_rank_0_merges_in_input_order(tmp_path):
    """Three ranks (threads) over 10 units, one of them done by an earlier run of two ranks: each unit is done once,
    the merge keeps input order, and the folder goes."""
    names = [f"{i}.png" for i in range(10)]
    key = {"command": "test"}
    folder = tmp_path / "out.partial"
    earlier = Partial(folder, key, state=_Rank(0, 1, threading.Barrier(1)))
    earlier.start()
    earlier.save_rows(4, [{"image": "4.png", "by": "earlier"}])
    worked, merged = {}, []

    def run(rank: int, barrier: threading.Barrier) -> None:
        p = Partial(folder, key, state=_Rank(rank, 3, barrier))
        done = p.start()
        mine = p.mine(len(names), {i for i, n in enumerate(names) if n in done})
        worked[rank] = mine
        for u in mine:
            p.save_rows(u, [{"image": names[u], "by": rank}])
        p.barrier()
        if p.is_main:
            merged.extend(p.ordered_rows(names))
        p.finish()

    barrier = threading.Barrier(3)
    threads = [threading.Thread(target=run, args=(r, barrier)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert worked == {0: [0, 3, 6, 9], 1: [1, 7], 2: [2, 5, 8]}  # 4 was done
    assert [r["image"] for r in merged] == names and merged[4]["by"] == "earlier"
    assert not folder.exists()


def test_a_foreign_folder_in_the_partial_place_is_left_alone(tmp_path, scenes, capsys):
    (tmp_path / "c.jsonl.partial").mkdir()
    (tmp_path / "c.jsonl.partial" / "mine.txt").write_text("a user's file")
    assert main(["caption", str(scenes), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "c.jsonl.partial" in _one_line(capsys) and (tmp_path / "c.jsonl.partial" / "mine.txt").exists()


@pytest.mark.dist
def test_torchrun_splits_the_images_and_keeps_input_order(tmp_path, scenes):
    """Two CPU processes (gloo): each captions, embeds and reconstructs its share; the outputs equal one process's."""
    from vlv.inference import caption_files, embed_files, reconstruct_files

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(WORKER), str(scenes), str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shares = [json.loads((tmp_path / "two" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [s["world"] for s in shares] == [2, 2] and [s["captioned"] for s in shares] == [3, 2]  # 0, 2, 4 | 1, 3
    one = tmp_path / "one"
    caption_files([scenes], one / "c.jsonl", batch_size=2)
    embed_files([scenes], one / "z.st", "shapes-stage1", batch_size=2)
    reconstruct_files([scenes], one / "rec", "shapes-stage1", "shapes-teacher", batch_size=2, steps=1)
    assert (tmp_path / "two" / "c.jsonl").read_text() == (one / "c.jsonl").read_text()
    assert torch.allclose(load_file(tmp_path / "two" / "z.st")["z"], load_file(one / "z.st")["z"], atol=1e-6)
    for p in sorted((one / "rec").iterdir()):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "two" / "rec" / p.name)))
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "two").iterdir())
