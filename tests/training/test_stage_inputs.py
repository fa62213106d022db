"""Inputs a full-scale run would get wrong, refused before anything loads: a remote-code Florence-2 dir (it would
parse into a wrong-sized random encoder), and a stage-2 decoder other than the one stage 1 trained against (z means
something only to its text encoder T). Stage 2 takes the stage-1 run's decoder and data resolution by default."""

import json
import shutil
from pathlib import Path

import pytest

from vlv.checks import text_width
from vlv.cli import main
from vlv.encoder import load_florence2
from vlv.errors import InvalidInput
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.stage1 import build_encoder, prepare_stage1, train_stage1
from vlv.training.stage2 import prepare_stage2

REMOTE_FLORENCE2 = Path(__file__).parents[3] / "shared" / "fixtures" / "official-04bbfbb" / "bases" / "florence2"
needs_fixture = pytest.mark.skipif(not REMOTE_FLORENCE2.is_dir(), reason="official fixtures not on this machine")


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vlv: error: "), err
    return err


@needs_fixture
def test_a_remote_code_florence2_dir_is_refused_naming_the_converter(tiny_teacher, shapes_data, tmp_path, capsys):
    with pytest.raises(InvalidInput, match="vlv import-official florence2"):
        load_florence2(REMOTE_FLORENCE2)
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder=str(REMOTE_FLORENCE2))
    with pytest.raises(InvalidInput, match="remote-code Florence-2"):
        prepare_stage1(settings, TrainConfig(steps=1, progress=False), tmp_path / "run")
    err = _one_line_error(capsys, ["train", "stage1", "--encoder", str(REMOTE_FLORENCE2), "--decoder",
                                   str(tiny_teacher), "--data", str(shapes_data["train"]), "--out",
                                   str(tmp_path / "cli")])
    assert "vlv import-official florence2" in err and str(REMOTE_FLORENCE2) in err
    err = _one_line_error(capsys, ["precompute", "vision", "--encoder", str(REMOTE_FLORENCE2), "--decoder",
                                   str(tiny_teacher), "--data", str(shapes_data["train"]), "--out",
                                   str(tmp_path / "cache")])
    assert "vlv import-official florence2" in err
    assert not any((tmp_path / d).exists() for d in ("run", "cli", "cache"))


@pytest.fixture(scope="module")
def stage1_run(tiny_teacher, shapes_data, tmp_path_factory):
    """A stage-1 run (one step): its stage1.json records the decoder and the data resolution."""
    run = tmp_path_factory.mktemp("s1") / "run"
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8, image_size=48, num_workers=0)
    assert train_stage1(settings, TrainConfig(steps=1, batch_size=2, progress=False), run) is not None
    return run


def _stage2(encoder, data, **kw) -> Stage2Settings:
    return Stage2Settings(encoder=str(encoder), lm="shapes-lm", data=str(data), **kw)


def test_stage2_takes_the_stage1_runs_decoder_and_resolution_and_refuses_another(stage1_run, tiny_teacher,
                                                                                 shapes_data, tmp_path, capsys):
    data, cfg = shapes_data["train"], TrainConfig(steps=1, progress=False)
    assert json.loads((stage1_run / "stage1.json").read_text())["decoder"] == str(Path(tiny_teacher).resolve())
    plan = prepare_stage2(_stage2(stage1_run, data), cfg, tmp_path / "a")
    assert plan.settings.decoder == str(Path(tiny_teacher).resolve()) and plan.settings.image_size == 48
    copy = shutil.copytree(tiny_teacher, tmp_path / "copy")  # the same T elsewhere is the same decoder
    assert prepare_stage2(_stage2(stage1_run, data, decoder=str(copy), image_size=64), cfg,
                          tmp_path / "b").settings.image_size == 64
    with pytest.raises(InvalidInput, match="whose text encoder differs"):
        prepare_stage2(_stage2(stage1_run, data, decoder="shapes-teacher"), cfg, tmp_path / "c")
    err = _one_line_error(capsys, ["train", "stage2", "--encoder", str(stage1_run), "--lm", "shapes-lm",
                                   "--decoder", "shapes-teacher", "--data", str(data), "--out", str(tmp_path / "d")])
    assert str(Path(tiny_teacher).resolve()) in err and "drop --decoder" in err
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_an_encoder_dir_without_a_record_needs_its_decoder_given(tiny_teacher, shapes_data, tmp_path, capsys):
    """An imported (or hand-saved) encoder has no stage1.json: nothing says which decoder it was trained against."""
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8)
    encoder = build_encoder(settings, text_width(tiny_teacher), seed=0).save_pretrained(tmp_path / "saved")
    data, cfg = shapes_data["train"], TrainConfig(steps=1, progress=False)
    with pytest.raises(InvalidInput, match="pass --decoder"):
        prepare_stage2(_stage2(encoder, data), cfg, tmp_path / "a")
    plan = prepare_stage2(_stage2(encoder, data, decoder=str(tiny_teacher)), cfg, tmp_path / "b")
    assert plan.settings.image_size is None  # the encoder's own size
    err = _one_line_error(capsys, ["train", "stage2", "--encoder", str(encoder), "--lm", "shapes-lm",
                                   "--data", str(data), "--out", str(tmp_path / "c")])
    assert "--decoder" in err


def test_the_shipped_stage1_names_its_decoder():
    from vlv.training.stage1 import recorded_decoder, stage1_record

    assert recorded_decoder(stage1_record("shapes-stage1")) == "shapes-teacher"
