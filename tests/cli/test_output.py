"""What the command line shows a user: every default in --help, one error prefix, one flag per idea, one
definition of each sampler, and, while it works, its own progress bars only (none under --quiet), with no
library warnings or loader bars from vlv's own loads, library calls included."""

import argparse
import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from vlv.cli import build_parser, commands, main, states_default

RECIPES = Path(__file__).parents[2] / "vlv" / "recipes"


def _options(parser: argparse.ArgumentParser):
    """(action, its entry as --help prints it, on one line) of every option a user can set: not --help, hidden
    aliases or subcommands."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                                   argparse._SubParsersAction)):
            continue
        yield action, " ".join(formatter._format_action(action).split())


def test_every_option_shows_its_default():
    parser = build_parser()
    missing = []
    for command in [parser, *commands(parser)]:
        in_required_group = {a for g in command._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action, text in _options(command):
            switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
            if switch or action.required or action in in_required_group:
                continue
            if not states_default(text) or "(default: None)" in text:
                missing.append(f"{command.prog} {'/'.join(action.option_strings) or action.dest}: {text!r}")
    assert not missing, "\n".join(missing)
    assert len(commands(parser)) >= 20  # the walk reached every command


def _help(*command: str) -> str:
    parser = build_parser()
    leaf = next(c for c in commands(parser) if c.prog == " ".join(("vlv", *command)))
    return " ".join(leaf.format_help().split())  # one line: the wrapping is the terminal's


def test_training_flags_show_the_recipe_values():
    """The value a run takes when the flag is not given, read from the command's default recipe."""
    stage1 = json.loads((RECIPES / "stage1" / "shapes.json").read_text())
    text = _help("train", "stage1")
    assert f"(default: {stage1['train']['steps']} from recipe stage1/shapes)" in text
    assert f"(default: {stage1['train']['batch_size']} from recipe stage1/shapes)" in text
    assert "(default: 5.0)" in text  # --checkpoint-minutes: not in the recipe, the loop's own default
    assert "the recipe's)" not in text
    teacher = json.loads((RECIPES / "teacher" / "shapes.json").read_text())
    text = _help("teacher", "train")
    assert f"(default: {teacher['unet']['steps']} from recipe teacher/shapes)" in text
    assert f"(default: {teacher['vae']['steps']} from recipe teacher/shapes)" in text
    assert "the stage-1 run's own" in _help("train", "stage2")  # --decoder


def test_errors_have_one_prefix(tmp_path, capsys):
    for argv in (["caption"], ["caption", "x", "--out", str(tmp_path / "c.jsonl"), "--batch-size", "0"],
                 ["train", "stage1", "--nope"], ["nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("vlv: error: ") and len(err.splitlines()) == 1, (argv, err)


def test_quiet_and_debug_go_before_or_after_the_command():
    parse = build_parser().parse_args
    base = ["data", "shapes", "--out", "never-made"]
    assert not parse(base).quiet and parse(["--quiet", *base]).quiet and parse([*base, "--quiet"]).quiet
    assert not parse(base).debug and parse(["--debug", *base]).debug and parse([*base, "--debug"]).debug


def test_one_flag_per_idea_old_spellings_hidden():
    parse = build_parser().parse_args
    images = ["caption", "x", "--out", "never.jsonl"]
    assert not parse(images).skip_bad  # named files: stop at a bad one
    assert parse([*images, "--on-bad-image", "skip"]).skip_bad and parse([*images, "--skip-bad"]).skip_bad
    assert not parse([*images, "--on-bad-image", "fail"]).skip_bad
    assert parse(["demo", "--budget-minutes", "30"]).minutes == parse(["demo", "--minutes", "30"]).minutes == 30
    assert "--skip-bad" not in _help("caption") and "--minutes" not in _help("demo").replace("--budget-minutes", "")


def test_drawing_commands_share_encoder_decoder_and_sampler_defaults():
    parse = build_parser().parse_args
    recon = parse(["reconstruct", "x", "--out", "never"])
    compose = parse(["compose", "a.png", "b.png", "--out", "never.png"])
    sample = parse(["teacher", "sample", "shapes-teacher", "--prompt", "p", "--out", "never.png"])
    for args in (recon, compose):
        assert (args.encoder, args.decoder) == ("shapes-stage1", "shapes-teacher")
    assert parse(["embed", "x", "--out", "never.safetensors"]).encoder == "shapes-stage1"
    for key in ("sampler", "cfg", "steps", "seed"):
        assert getattr(recon, key) == getattr(compose, key) == getattr(sample, key), key


def test_one_definition_of_each_sampler():
    """Every function that draws defaults to the same guidance and leaves steps to the sampler."""
    from vlv import api, inference
    from vlv.config import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from vlv.decoder import DiffusionDecoder
    from vlv.diffusion import sample, sampler_steps
    from vlv.shapes.teacher import sample_files

    assert {s: sampler_steps(s) for s in DEFAULT_STEPS} == {"fast": 20, "paper": 50} and sampler_steps("paper", 7) == 7
    for fn in (sample, sample_files, DiffusionDecoder.reconstruct, api.VLV.reconstruct, inference.reconstruct_images,
               inference.compose_images, inference.reconstruct_files, inference.compose_files):
        params = inspect.signature(fn).parameters
        assert params["guidance_scale"].default == DEFAULT_GUIDANCE, fn.__qualname__
        assert params.get("steps", inspect.Parameter("steps", 1, default=None)).default is None, fn.__qualname__


def test_teacher_sample_paper_runs_the_papers_step_count(tmp_path, monkeypatch):
    """The teacher's paper sampler draws DDPM for 50 steps, as reconstruction's does (it ran 20)."""
    from types import SimpleNamespace

    import torch
    from diffusers import StableDiffusionPipeline

    from vlv.shapes.teacher import sample_files

    calls = []

    def record(self, **kwargs):
        calls.append((type(self.scheduler).__name__, kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return SimpleNamespace(images=torch.zeros(len(kwargs["prompt"]), 3, 8, 8))

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", record)
    sample_files("shapes-teacher", ["a small red circle at the top left"], tmp_path / "a.png", sampler="paper")
    sample_files("shapes-teacher", ["a small red circle at the top left"], tmp_path / "b.png")
    assert calls == [("DDPMScheduler", 50, 2.0), ("DPMSolverMultistepScheduler", 20, 2.0)]


def test_vlv_loads_print_nothing_and_leave_the_libraries_settings(capfd, tmp_path):
    """A library call that loads or saves weights prints no bar and raises no warning; the libraries' own
    progress switches are as the caller left them, before and after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from vlv.decoder import DiffusionDecoder
    from vlv.diffusion import load_pipeline
    from vlv.encoder import VLVEncoder
    from vlv.shapes.config import TeacherConfig
    from vlv.shapes.teacher import save_teacher
    from vlv.shipped import shipped_dir
    from vlv.text_encoder import load_text_encoder

    def hook(factory, args, kwargs):
        return factory(*args, **kwargs)

    transformers_logging.set_tqdm_hook(hook)  # a user's own hook: still theirs afterwards
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DiffusionDecoder.from_pretrained("shapes-teacher")
            load_text_encoder(shipped_dir("shapes-teacher"))
            VLVEncoder.from_pretrained("shapes-stage1")
            save_teacher(load_pipeline(shipped_dir("shapes-teacher")), tmp_path / "teacher", TeacherConfig())
        assert transformers_logging.set_tqdm_hook(None) is hook
    finally:
        transformers_logging.set_tqdm_hook(None)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
    assert diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a user who turned diffusers' bars off keeps them off
    try:
        DiffusionDecoder.from_pretrained("shapes-teacher")
        assert not diffusers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()


def _shown_lines(err: str) -> list[str]:
    """stderr as a terminal leaves it: what a \\r redraw overwrote is gone."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.replace("\r\n", "\n").split("\n")]
    return [line for line in lines if line.strip()]


@pytest.mark.slow
def test_import_vlv_prints_nothing():
    code = "import vlv, vlv.api, vlv.decoder, vlv.inference, vlv.shapes.teacher"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


@pytest.mark.slow
def test_a_command_loading_the_decoder_shows_its_own_bar_only(tmp_path):
    """reconstruct with the shipped weights: one bar on stderr (no warning, no loader lines); --quiet: nothing."""
    from vlv.shapes.data import write_shapes

    scenes = write_shapes(tmp_path / "scenes", n=2, seed=0, split="test", progress=False)
    for quiet in ([], ["--quiet"]):
        out = tmp_path / f"recon{len(quiet)}"
        r = subprocess.run([sys.executable, "-m", "vlv.cli", "reconstruct", str(scenes), "--out", str(out),
                            "--steps", "1", *quiet], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and len(list(out.glob("*.png"))) == 2, r.stderr
        shown = _shown_lines(r.stderr)
        if quiet:
            assert r.stderr == "", r.stderr
        else:
            assert shown and all(line.startswith("reconstruct: ") for line in shown), r.stderr


def test_an_error_after_a_bar_started_is_still_one_line(tmp_path, capsys):
    """A bar open when a bad input stops the work is wiped (not left as a line above the error)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not a png")
    assert main(["data", "shards", str(bad), "--out", str(tmp_path / "sh")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip("\n").split("\r")[-1].startswith("vlv: error: "), repr(err)
    assert not (tmp_path / "sh").exists()
