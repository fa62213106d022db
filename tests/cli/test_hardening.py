"""Bad or odd inputs, one class each: a user's mistake is one line naming it and exit status 2, refused before any
model loads or any output appears; a bug is a traceback; odd but valid images work.

The commands run in-process (``vlv.cli.main``) on the shipped shapes weights: seconds each.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlv.cli import main

WEIGHTS = Path(__file__).parents[2] / "vlv" / "weights"


def _error(capsys) -> str:
    """The command's stderr as a terminal shows it (a progress bar erased by \\r is gone): one line."""
    err = capsys.readouterr().err.replace("\r\n", "\n")
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    shown = [line for line in shown if line.strip()]
    assert len(shown) == 1, err
    return shown[0]


@pytest.fixture
def scenes(tmp_path):
    """Four shapes scenes: an image-caption folder."""
    from vlv.shapes.data import write_shapes

    return write_shapes(tmp_path / "scenes", n=4, seed=0, split="val", progress=False)


@pytest.fixture
def bad_images(tmp_path, scenes):
    """A zero-byte, a truncated and a not-an-image file with image names, beside one good image."""
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(scenes / "000000.png", folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "torn.png").write_bytes((scenes / "000001.png").read_bytes()[:120])
    (folder / "text.jpg").write_text("not an image")
    return folder


def test_bad_image_files_are_named_or_skipped(bad_images, scenes, tmp_path, capsys):
    for name in ("empty.png", "torn.png", "text.jpg"):
        out = tmp_path / f"rec-{name}"
        assert main(["reconstruct", str(bad_images / "good.png"), str(bad_images / name), "--encoder",
                     "shapes-stage1", "--decoder", "shapes-teacher", "--out", str(out)]) == 2
        assert name in _error(capsys) and not out.exists()
    assert main(["caption", str(bad_images), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "empty.png" in _error(capsys) and not (tmp_path / "c.jsonl").exists()
    # --skip-bad: the good image is captioned, the three bad ones counted
    assert main(["caption", str(bad_images), "--out", str(tmp_path / "c.jsonl"), "--skip-bad"]) == 0
    assert "skipped 3 unreadable image(s) of 4" in capsys.readouterr().out
    assert [json.loads(r)["image"] for r in (tmp_path / "c.jsonl").read_text().splitlines()] == ["good.png"]
    # training: a held-out folder with a torn image; the teacher under --on-bad-image fail
    shutil.copy(bad_images / "torn.png", scenes / "000002.png")
    assert main(["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--val", str(scenes),
                 "--out", str(tmp_path / "s1")]) == 2
    assert "000002.png" in _error(capsys) and not (tmp_path / "s1").exists()
    assert main(["teacher", "train", "--data", str(scenes), "--out", str(tmp_path / "t"), "--tiny",
                 "--on-bad-image", "fail"]) == 2
    assert "000002.png" in _error(capsys) and not (tmp_path / "t").exists()


def test_bad_images_in_training_data_are_skipped_and_counted(bad_images, tmp_path):
    from vlv.data.datasets import InMemory

    folder = InMemory.of(bad_images, 16, skip_bad=True)
    assert len(folder) == 1 and sorted(b.split()[0] for b in folder.bad) == ["empty", "text", "torn"]


def test_odd_but_valid_images_load(tmp_path):
    from vlv.data.images import load_image

    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # (64, 64)
    rgba = np.zeros((64, 64, 4), np.uint8)  # fully transparent black: composited on white
    odd = {"rgba.png": Image.fromarray(rgba), "l.png": Image.fromarray(grey),
           "la.png": Image.fromarray(grey).convert("LA"), "p.png": Image.fromarray(grey).convert("P"),
           "i16.png": Image.fromarray(grey.astype(np.uint16) * 257),
           "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "one.png": Image.new("RGB", (1, 1), (9, 9, 9)),
           "wide.png": Image.new("RGB", (5000, 2)), "tall.png": Image.new("L", (3, 4000))}
    for name, im in odd.items():
        im.save(tmp_path / name)
        x = load_image(tmp_path / name, 32)
        assert x.shape == (32, 32, 3) and x.dtype == np.uint8, name
    assert (load_image(tmp_path / "rgba.png", 32) == 255).all()
    assert np.abs(load_image(tmp_path / "i16.png", 32).astype(int) - load_image(tmp_path / "l.png", 32)).max() <= 1
    assert load_image(tmp_path / "cmyk.jpg", 32)[..., 0].mean() > 200  # red survives CMYK


def test_torn_or_foreign_weights_are_named(tmp_path, scenes, capsys):
    torn = tmp_path / "torn-encoder"
    shutil.copytree(WEIGHTS / "shapes-stage1", torn)
    (torn / "model.safetensors").write_bytes((WEIGHTS / "shapes-stage1" / "model.safetensors").read_bytes()[:4000])
    assert main(["reconstruct", str(scenes / "000000.png"), "--encoder", str(torn), "--decoder", "shapes-teacher",
                 "--out", str(tmp_path / "rec")]) == 2
    assert "torn-encoder/model.safetensors" in _error(capsys) and not (tmp_path / "rec").exists()
    pickled = tmp_path / "pickled-captioner"
    shutil.copytree(WEIGHTS / "shapes-stage2", pickled)
    (pickled / "captioner.safetensors").write_bytes(pickle.dumps({"weight": [1.0]}))
    assert main(["caption", str(scenes), "--model", str(pickled), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "captioner.safetensors" in _error(capsys) and not (tmp_path / "c.jsonl").exists()
    # a run dir whose checkpoint was torn: resuming says so, and what to do
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "trainer.json").write_text(json.dumps({"step": 1}))
    (run / "checkpoint" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--out", str(run)]) == 2
    err = _error(capsys)
    assert "cannot resume" in err and "checkpoint" in err and "delete it" in err


def test_incomplete_stable_diffusion_dir_is_refused(tmp_path, scenes, capsys):
    sd = tmp_path / "sd"
    shutil.copytree(WEIGHTS / "shapes-teacher", sd, ignore=shutil.ignore_patterns("unet"))
    assert main(["teacher", "sample", str(sd), "--prompt", "a red circle", "--out", str(tmp_path / "a.png")]) == 2
    assert "no unet/" in _error(capsys) and not (tmp_path / "a.png").exists()
    assert main(["train", "stage1", "--decoder", str(sd), "--data", str(scenes), "--out", str(tmp_path / "s1")]) == 2
    assert "no unet/" in _error(capsys) and not (tmp_path / "s1").exists()


def test_captions_rows_of_the_wrong_types_name_their_line(tmp_path, scenes, capsys):
    rows = (scenes / "captions.jsonl").read_text().splitlines()
    rows[2] = json.dumps({"image": 7, "caption": "a red circle"})
    (scenes / "captions.jsonl").write_text("\n".join(rows) + "\n")
    for argv in (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes)],
                 ["teacher", "train", "--data", str(scenes), "--tiny"], ["data", "shards", str(scenes)]):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = _error(capsys)
        assert "captions.jsonl:3" in err and '"image"' in err and not (tmp_path / "out").exists(), err


def test_empty_prompt_samples(tmp_path, capsys):
    out = tmp_path / "empty.png"
    assert main(["teacher", "sample", "shapes-teacher", "--prompt", "", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_inputs_are_checked_before_models_load_or_outputs_appear(tmp_path, scenes, capsys):
    empty, captionless = tmp_path / "empty", tmp_path / "captionless"
    empty.mkdir()
    captionless.mkdir()
    shutil.copy(scenes / "000000.png", captionless / "a.png")
    out = tmp_path / "out"
    cases = [(["teacher", "train", "--data", str(tmp_path / "missing"), "--out", str(out)], "missing"),
             (["teacher", "train", "--data", str(empty), "--out", str(out)], "empty"),
             (["teacher", "train", "--data", str(captionless), "--out", str(out)], "no caption"),
             (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--encoder", "nosuch",
               "--out", str(out)], "nosuch"),
             (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--lr", "-1",
               "--out", str(out)], "lr"),
             (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--nq", "500",
               "--out", str(out)], "--nq 500"),
             (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--sharding", "fsdp2",
               "--out", str(out)], "several processes"),
             (["compose", str(scenes / "000000.png"), str(scenes / "000001.png"), "--encoder", "shapes-stage1",
               "--decoder", "shapes-teacher", "--k", "99", "--out", str(out / "ab.png")], "--k 99")]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = _error(capsys)  # one line: no loading bars or warnings before it
        assert named in err and not out.exists(), (argv, err)


def test_unwritable_out_names_the_argument(tmp_path, scenes, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (["caption", str(scenes)], ["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes)]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(blocker / "out")])
        assert e.value.code == 2
        err = _error(capsys)
        assert "argument --out" in err and "a-file is a file" in err


def test_only_user_errors_are_one_line(tmp_path, scenes, monkeypatch, capsys):
    from vlv.errors import UserError

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    assert main(["data", "sheet", str(scenes), "--out", str(tmp_path / "sheet.png")]) == 0
    assert "TRANSFORMERS_VERBOSITY" not in os.environ  # transformers' own warnings are left on
    capsys.readouterr()

    def bug(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr("vlv.cli.data.cmd_data_sheet", bug)
    monkeypatch.delenv("VLV_DEBUG", raising=False)
    argv = ["data", "sheet", str(scenes), "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1  # a bug: one line saying so (status 1, not a user error's 2), naming --debug
    err = _error(capsys)
    assert err.startswith("vlv: error: internal error") and "ValueError: an internal bug" in err and "--debug" in err
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # its traceback, for a report
        with pytest.raises(ValueError, match="an internal bug"):
            main(debug)
    monkeypatch.setenv("VLV_DEBUG", "1")
    with pytest.raises(ValueError, match="an internal bug"):
        main(argv)
    monkeypatch.delenv("VLV_DEBUG")
    monkeypatch.setattr("vlv.cli.data.cmd_data_sheet", lambda args: (_ for _ in ()).throw(UserError("your mistake")))
    assert main(argv) == 2 and _error(capsys) == "vlv: error: your mistake"


def test_a_folder_named_like_a_preset_is_ambiguous(tmp_path, scenes, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    assert main(["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--encoder", "shapes",
                 "--out", "run"]) == 2
    assert "./shapes" in _error(capsys) and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_on_bad_image_fail_names_it_and_exits(bad_images, scenes, tmp_path):
    """Through decoding workers too: the worker's error arrives as one line, and the workers (which ignore a
    group SIGTERM) do not keep the process from exiting."""
    import subprocess
    import sys

    shutil.copy(bad_images / "text.jpg", scenes / "000003.png")
    r = subprocess.run([sys.executable, "-m", "vlv.cli", "train", "stage1", "--decoder", "shapes-teacher", "--data",
                        str(scenes), "--out", str(tmp_path / "s1"), "--nq", "4", "--steps", "2", "--batch-size", "4",
                        "--num-workers", "2", "--no-cache-vision", "--no-cache-latents", "--on-bad-image", "fail"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().split("\n")[-1]
    assert last.startswith("vlv: error: bad image 000003") and "000003.png" in last, r.stderr[-2000:]


def test_a_resumed_run_refuses_changed_settings_unless_overridden(tmp_path, scenes, capsys):
    """A run dir with a checkpoint resumes with the settings it started with: another lr or seed is named and
    refused, a changed time limit is not a change, and --resume override goes on with the new settings."""
    out = tmp_path / "lm"
    base = ["train", "lm", "--data", str(scenes), "--out", str(out), "--steps", "4", "--batch-size", "2"]
    assert main([*base, "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--lr", "5e-4", "--seed", "3"]) == 2
    err = _error(capsys)
    assert "train.lr" in err and "train.seed" in err and "--resume override" in err, err
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 2  # untouched
    assert main([*base, "--minutes", "30", "--stop-after", "1"]) == 0  # how it stops is free
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 3
    assert main([*base, "--lr", "5e-4", "--resume", "override"]) == 0
    assert json.loads((out / "lm.json").read_text())["train"]["lr"] == 5e-4


@pytest.mark.slow
def test_kill_soak_short_form(tmp_path):
    """The kill soak (``vlv.testing``; benchmarks/kill_soak.py runs it on every command), short: `vlv train lm`
    SIGKILLed three times at random moments (checkpointing every step), resumed each time, ends with the
    uninterrupted run's weights, and no killed state is unloadable."""
    import random

    from vlv.shapes.data import write_shapes
    from vlv.testing import soak

    data = write_shapes(tmp_path / "data", n=48, seed=0, split="train", progress=False)
    argv = ["train", "lm", "--data", str(data), "--steps", "120", "--batch-size", "4", "--checkpoint-every", "1"]
    row = soak("lm", argv, tmp_path, kills=3, rng=random.Random(0))
    assert row["kills"] == 3 and row["equal"] and row["files"] and not row["unloadable"], row


# ------------------------------------------------------------------ bad-input classes: one line, nothing left behind
def _only_bad(tmp_path, scenes) -> dict[str, Path]:
    """Training sets none of whose images reads: a folder (corrupt, empty and missing files), a tar shard."""
    import io
    import tarfile

    folder = tmp_path / "all-bad"
    folder.mkdir()
    rows = (scenes / "captions.jsonl").read_text().splitlines()
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "000000.png").write_text("not an image")
    (folder / "000001.png").write_bytes(b"")
    (folder / "000002.png").write_bytes((scenes / "000002.png").read_bytes()[:100])  # 000003.png: missing
    shard = tmp_path / "all-bad.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(3):
            for ext, data in (("jpg", b"\xff\xd8\xff torn"), ("txt", b"a red circle")):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return {"folder": folder, "shard": shard}


def test_a_training_set_of_only_bad_images_is_refused(tmp_path, scenes, capsys):
    """Training skips a bad image, so a set of nothing else passed every check and failed steps in (a ValueError
    traceback, the run dir left); now it is refused while the run is prepared."""
    out = tmp_path / "run"
    for kind, data in _only_bad(tmp_path, scenes).items():
        for argv in (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(data)],
                     ["train", "stage2", "--encoder", "shapes-stage1", "--lm", "shapes-lm", "--data", str(data)]):
            assert main([*argv, "--out", str(out)]) == 2, (kind, argv)
            err = _error(capsys)
            assert f"{data}: none of its" in err and "readable image" in err and not out.exists(), err


def test_precompute_over_only_bad_images_is_refused(tmp_path, scenes, capsys):
    """It used to exit 0 with a cache of empty rows."""
    data = _only_bad(tmp_path, scenes)["shard"]
    out = tmp_path / "cache"
    for argv in (["precompute", "latents", "--decoder", "shapes-teacher"],
                 ["precompute", "text-embeds", "--decoder", "shapes-teacher", "--encoder", "shapes-stage1"]):
        assert main([*argv, "--data", str(data), "--out", str(out), "--quiet"]) == 2, argv
        err = _error(capsys)
        assert f"{data}: none of its 3 samples" in err and not out.exists(), err


def test_a_torn_run_dir_json_is_named(tmp_path, scenes, capsys):
    """Every JSON a run dir holds is read through one checked reader: a torn file (or one lacking what vlv wrote)
    is one line naming it, whichever command reads it."""
    enc, cap = tmp_path / "enc", tmp_path / "cap"
    shutil.copytree(WEIGHTS / "shapes-stage1", enc)
    shutil.copytree(WEIGHTS / "shapes-stage2", cap)
    (enc / "encoder.json").write_text('{"config": ')
    (cap / "captioner.json").write_text(json.dumps({"lm": {}}))  # valid JSON, not a captioner's
    cache = tmp_path / "latents"
    cache.mkdir()
    (cache / "cache.json").write_text("{")
    out = tmp_path / "out"
    cases = [(["embed", str(scenes), "--encoder", str(enc), "--out", str(out / "z.safetensors")], "enc/encoder.json"),
             (["reconstruct", str(scenes), "--encoder", str(enc), "--decoder", "shapes-teacher", "--out", str(out)],
              "enc/encoder.json"),
             (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--init", str(enc), "--out",
               str(out)], "enc/encoder.json"),
             (["train", "stage2", "--encoder", str(enc), "--lm", "shapes-lm", "--data", str(scenes), "--out",
               str(out)], "enc/encoder.json"),
             (["caption", str(scenes), "--model", str(cap), "--out", str(out / "c.jsonl")], "cap/captioner.json"),
             (["train", "stage1", "--decoder", "shapes-teacher", "--data", str(scenes), "--latents-cache", str(cache),
               "--out", str(out)], "latents/cache.json")]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = _error(capsys)
        assert named in err and ("JSON" in err or "not the file vlv wrote" in err), err
        assert not out.exists(), argv


def test_a_decoder_of_another_width_is_refused_before_loading(tmp_path, scenes, capsys):
    """z goes through the decoder's text encoder: another width was a shape-mismatch traceback."""
    wide = tmp_path / "wide-teacher"
    shutil.copytree(WEIGHTS / "shapes-teacher", wide)
    config = json.loads((wide / "text_encoder" / "config.json").read_text())
    (wide / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 1024}))
    out = tmp_path / "out"
    for argv in (["embed", str(scenes), "--encoder", "shapes-stage1", "--decoder", str(wide), "--out",
                  str(out / "z.safetensors")],
                 ["reconstruct", str(scenes), "--encoder", "shapes-stage1", "--decoder", str(wide), "--out", str(out)],
                 ["train", "stage2", "--encoder", "shapes-stage1", "--decoder", str(wide), "--lm", "shapes-lm",
                  "--data", str(scenes), "--out", str(out)]):
        assert main(argv) == 2, argv
        err = _error(capsys)
        assert "wide-teacher" in err and not out.exists(), err
        if argv[0] == "train":  # stage 2 refuses any T but the stage-1 run's own, widths aside
            assert "was trained against shapes-teacher" in err, err
        else:
            assert "1024" in err and "128" in err, err


def test_an_output_the_system_refuses_is_one_line_before_any_work(tmp_path, scenes, capsys, monkeypatch):
    """Permission bits pass root everywhere, and a virtual or read-only file system refuses only the write: the
    folder is probed with a real (nameless) file, so the refusal comes first, in one line, not after the work."""
    from vlv.inference import caption_files

    refused = Path("/proc/vlv-test/c.jsonl")  # no process, root included, creates files in /proc
    with pytest.raises(SystemExit) as e:
        main(["caption", str(scenes), "--out", str(refused)])
    assert e.value.code == 2 and "argument --out" in (err := _error(capsys)) and "cannot write to /proc" in err
    monkeypatch.setattr("vlv.captioner.Captioner.from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(ValueError, match="cannot write to /proc"):  # the library checks it too
        caption_files([scenes], refused)
    with pytest.raises(SystemExit):  # a device is never renamed over
        main(["caption", str(scenes), "--out", "/dev/null"])
    assert "not a regular file" in _error(capsys)
    if os.geteuid() != 0:  # a folder without write permission (root may write anywhere)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(SystemExit):
            main(["caption", str(scenes), "--out", str(locked / "c.jsonl")])
        assert "cannot write to" in _error(capsys)
