"""Recipes are data: every shipped one builds its task's dataclasses strictly, and a misspelt or misplaced one
fails loudly instead of training with defaults."""

import json
from pathlib import Path

import pytest

from vlv.errors import InvalidInput
from vlv.shapes.config import TeacherSettings, sd3_teacher_recipe, teacher_recipe
from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.recipes import list_recipes, load_recipe, resolved, section

SETTINGS = {"stage1": (Stage1Settings, {"decoder": "d", "data": "x"}),
            "stage2": (Stage2Settings, {"decoder": "d", "encoder": "e", "lm": "l", "data": "x"}),
            "lm": (LMSettings, {"data": "x"}), "teacher": (TeacherSettings, {})}


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_every_shipped_recipe_builds(task):
    names = list_recipes(task)
    assert names
    cls, required = SETTINGS[task]
    for name in names:
        recipe = load_recipe(name, task)
        assert recipe["description"]
        if recipe.get("layout") == "sd3":  # the SD3-layout teacher: its own settings, one loop
            sd3_teacher_recipe(name)
            continue
        section(recipe, "settings", cls, **required)
        if task == "teacher":  # a loop per phase
            teacher_recipe(name)
        else:
            section(recipe, "train", TrainConfig)


def test_demo_recipes_name_a_recipe_per_stage():
    from vlv.shapes.demo import STAGES, demo_recipe, stage_recipe

    for name in ("default", "quick"):
        demo = demo_recipe(name)
        for stage in STAGES:
            _, cfg = stage_recipe(demo, stage, budget=None if demo["minutes"] is None else 1.0)
            assert cfg.batch_size == demo["stages"][stage]["train"]["batch_size"]


def test_the_default_demo_trains_fixed_steps_and_says_how_long_it_has_left():
    from vlv.shapes.demo import Eta, demo_recipe, run_demo, stage_recipe

    demo = demo_recipe("default")
    assert demo["minutes"] is None  # reproducible: no stage plans its steps from the machine's pace
    assert all(stage_recipe(demo, s, budget=None)[1].budget_minutes is None for s in demo["stages"])
    eta = Eta({"data": 0.2, "lm": 1.0, "stage1": 4.0, "evaluate": 1.0}, timings={})
    assert "about 6 min left" in eta.line("data")  # nothing timed yet: the reference pace
    eta.timings["data"] = 1.0  # too short a part to tell the machine's pace
    assert "about 6 min left" in eta.line("lm")
    eta.timings["lm"] = 120.0  # this machine took twice the reference
    assert "about 10 min left" in eta.line("stage1")
    with pytest.raises(ValueError, match="time shares"):  # a time budget needs each stage's share
        run_demo(Path("never-made"), recipe="quick", minutes=10.0)
    assert not Path("never-made").exists()


def test_flags_override_single_fields_and_the_result_is_recorded():
    recipe = load_recipe("shapes", "stage1")
    cfg = section(recipe, "train", TrainConfig, {"lr": 3e-4, "steps": None})
    assert (cfg.lr, cfg.steps, cfg.betas) == (3e-4, recipe["train"]["steps"], tuple(recipe["train"]["betas"]))
    record = resolved(recipe, train=cfg)
    assert record["name"] == "stage1/shapes" and record["train"]["lr"] == 3e-4
    assert load_recipe(record["name"], "stage1") == recipe  # the recorded name loads the same recipe


def test_bad_recipes_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="shapes-scratch"):  # the message lists the task's own
        load_recipe("no-such-recipe", "stage1")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"task": "stage1", "train": {"learning_rate": 1e-4}}))
    with pytest.raises(ValueError, match="learning_rate"):
        section(load_recipe(path, "stage1"), "train", TrainConfig)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_recipe(path, "stage1")


def test_every_shipped_recipe_lives_in_its_tasks_folder():
    from vlv.training.recipes import RECIPES

    for name in list_recipes():
        task = name.split("/")[0]
        assert json.loads((RECIPES / f"{name}.json").read_text())["task"] == task, name
    assert set(list_recipes("stage1")) == {"paper", "shapes", "shapes-scratch"}
    assert list_recipes("demo") == ["default", "quick"]


def test_a_name_is_looked_up_in_its_tasks_folder_only(tmp_path):
    assert load_recipe("paper", "stage2")["name"] == "stage2/paper"  # each task has its own "paper"
    assert load_recipe("paper", "stage2")["train"] != load_recipe("paper", "stage1")["train"]
    with pytest.raises(FileNotFoundError, match=r"no stage2 recipe 'shapes-scratch'.*paper, shapes$"):
        load_recipe("shapes-scratch", "stage2")  # a stage-1 name is not found in stage 2's folder
    with pytest.raises(FileNotFoundError, match="no lm recipe 'default'"):
        load_recipe("default", "lm")
    with pytest.raises(ValueError, match="not a stage2 recipe"):  # another task's recipe, named in full
        load_recipe("stage1/shapes", "stage2")
    with pytest.raises(FileNotFoundError):  # never a file beside or above the task folders
        load_recipe("../recipes/stage1/shapes", "stage1")
    mine = tmp_path / "mine.json"
    mine.write_text((Path(__file__).parents[2] / "vlv/recipes/stage1/paper.json").read_text())
    assert load_recipe(mine, "stage1")["name"] == str(mine)
    with pytest.raises(ValueError, match="not a stage2 recipe"):  # a file of another task is refused
        load_recipe(mine, "stage2")


@pytest.mark.parametrize("old,task,hint", [("paper-stage1", "stage1", "stage1's 'paper'"),
                                           ("shapes-teacher", "teacher", "teacher's 'shapes'"),
                                           ("demo-quick", "demo", "demo's 'quick'"),
                                           ("shapes-stage2", "stage1", "stage2's 'shapes'")])
def test_an_old_flat_name_is_refused_with_its_new_one(old, task, hint):
    with pytest.raises(FileNotFoundError, match=f"named per task now, it is {hint}") as e:
        load_recipe(old, task)
    assert "\n" not in str(e.value)


def test_the_cli_names_the_new_recipe_in_one_line(capsys):
    from vlv.cli import main

    assert main(["train", "stage1", "--recipe", "paper-stage1", "--decoder", "d", "--data", "x",
                 "--out", "never-made"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--recipe paper" in err, err
    assert not Path("never-made").exists()


def test_a_demo_run_dir_recorded_under_the_old_names_keeps_its_identity(tmp_path):
    from vlv.shapes.demo import _check_stages

    meta = {"recipe": "demo-quick", "stages": {s: "demo-quick" for s in ("lm", "stage1", "stage2")}}
    # made by the quick recipe before it was renamed: resumes
    _check_stages(tmp_path, meta, "demo/quick", "shapes-teacher")
    with pytest.raises(InvalidInput, match="lm by 'demo/quick'"):
        _check_stages(tmp_path, meta, "demo/default", "shapes-teacher")


def test_a_demo_run_dir_distils_the_teacher_it_holds(tmp_path):
    from vlv.shapes.demo import _check_stages

    (tmp_path / "teacher").mkdir()
    _check_stages(tmp_path, {}, "demo/quick", "shapes-teacher")  # from before --teacher: the UNet teacher's
    _check_stages(tmp_path, {"teacher_name": "t3"}, "demo/quick", "t3")
    with pytest.raises(InvalidInput, match="holds the teacher 'shapes-teacher', this run distils 't3'"):
        _check_stages(tmp_path, {}, "demo/quick", "t3")


def test_the_teacher_recipe_is_a_loop_per_phase_and_its_settings():
    recipe = teacher_recipe()
    assert recipe.name == "teacher/shapes"
    assert (recipe.vae.steps, recipe.vae.batch_size, recipe.vae.lr, recipe.vae.ema_decay) == (2000, 32, 2e-3, None)
    assert (recipe.unet.steps, recipe.unet.batch_size, recipe.unet.ema_decay) == (15000, 64, 0.999)
    assert recipe.settings.eval_guidance == (2.0, 4.0)
    mine = teacher_recipe(settings={"seed": 5, "caption_dropout": 0.2}, vae={"steps": 3}, unet={"lr": 5e-4})
    assert (mine.vae.steps, mine.unet.steps, mine.unet.lr, mine.vae.lr) == (3, 15000, 5e-4, 2e-3)
    assert mine.settings.caption_dropout == 0.2 and mine.vae.seed == mine.unet.seed == 5  # one seed for the run
    assert set(mine.record()) == {"settings", "vae", "unet"}


@pytest.mark.parametrize("sections,match", [({"vae": {"seed": 1}}, "section 'vae': seed is not a phase's"),
                                            ({"unet": {"batch": 8}}, "section 'unet': unknown fields batch"),
                                            ({"unet": {"ema_decay": None}}, "exports the UNet's EMA"),
                                            ({"vae": {"min_lr_ratio": 2.0}}, "vae: min_lr_ratio"),
                                            ({"settings": {"vae_steps": 9}}, "unknown fields vae_steps"),
                                            ({"train": {"steps": 9}}, "unknown sections train")])
def test_a_bad_teacher_recipe_fails_loudly(tmp_path, sections, match):
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"task": "teacher", **sections}))
    with pytest.raises(InvalidInput, match=match):
        teacher_recipe(path)


def test_teacher_phase_flags_override_their_own_section():
    from vlv.cli import build_parser
    from vlv.cli.flags import given

    args = build_parser().parse_args(["teacher", "train", "--data", "d", "--out", "never-made", "--vae-steps", "3",
                                      "--unet-batch-size", "4", "--unet-lr", "1e-4", "--seed", "2"])
    assert given(args, TrainConfig, "vae") == {"steps": 3}
    assert given(args, TrainConfig, "unet") == {"batch_size": 4, "lr": 1e-4}
    assert given(args, TeacherSettings) == {"seed": 2}
    for owned in ("--vae-seed", "--unet-minutes", "--vae-resume"):  # the run's, not a phase's
        with pytest.raises(SystemExit):
            build_parser().parse_args(["teacher", "train", "--data", "d", "--out", "x", owned, "1"])


def test_an_older_teacher_runs_flat_record_is_still_compared_on_resume():
    """A run started before the teacher recipe had sections (its recipe.json flat, as the shipped teacher's record
    is): its fields map onto the sections, so a resume still names what changed."""
    from vlv.shapes.teacher import upgraded
    from vlv.training.resume import changed_settings

    flat = json.loads((Path(__file__).parents[2] / "vlv/weights/shapes-teacher/teacher.json").read_text())
    old = upgraded({"config": {}, "recipe": flat["training"]["recipe"]})
    same = teacher_recipe(**{k: old[k] for k in ("settings", "vae", "unet")})
    assert changed_settings(old, {"config": {}, **same.record()}) == []
    moved = teacher_recipe(settings=old["settings"], vae=old["vae"], unet={**old["unet"], "lr": 1e-4})
    assert changed_settings(old, {"config": {}, **moved.record()}) == ["unet.lr"]


@pytest.mark.parametrize("settings, config, names", [
    (Stage1Settings, "EncoderConfig", ("num_queries", "phi_init_gain")),
    (Stage2Settings, "CaptionerConfig", ("trainable", "lora_rank", "max_new_tokens", "num_beams")),
])
def test_a_setting_that_is_a_model_config_field_says_what_the_config_says(settings, config, names):
    from dataclasses import MISSING, fields

    import vlv.config

    source = {f.name: f for f in fields(getattr(vlv.config, config))}
    for f in fields(settings):
        if f.name in names:
            want = source[f.name]
            default = want.default if want.default is not MISSING else want.default_factory()
            assert f.default == default, f.name
            assert f.metadata["help"].startswith(want.metadata["help"]), f.name
