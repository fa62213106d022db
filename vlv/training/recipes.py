"""Recipes: how a stage trains, as data files named per task (``vlv/recipes/<task>/<name>.json``), not as
constants in code.

A recipe holds a ``task`` (stage1, stage2, lm, florence2, teacher, demo), a ``description``, and the sections its
task reads: ``train`` (the loop's :class:`vlv.training.loop.TrainConfig` fields) and ``settings`` (the task's
method settings). Every training command takes ``--recipe NAME|FILE``: a NAME is looked up in its task's folder
(``vlv train stage1 --recipe paper`` reads ``stage1/paper.json``); flags override single fields; the run dir
saves the resolved recipe beside its weights. The file keeps its ``task`` key, so a recipe copied out of its
folder and given by path is still checked to be the command's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from vlv.errors import InvalidInput, UserError

RECIPES = Path(__file__).parent.parent / "recipes"

# The flat names recipes had before they were named per task: refused with the new name, never loaded.
RENAMED = {"paper-stage1": "stage1/paper", "paper-stage2": "stage2/paper", "shapes-stage1": "stage1/shapes",
           "shapes-stage1-scratch": "stage1/shapes-scratch", "shapes-stage2": "stage2/shapes",
           "shapes-lm": "lm/shapes", "shapes-florence2": "florence2/shapes", "shapes-teacher": "teacher/shapes",
           "demo": "demo/default", "demo-quick": "demo/quick"}


def list_recipes(task: str | None = None) -> list[str]:
    """Names of the shipped recipes of ``task`` (``paper``, ``shapes``...); without a task, every ``task/name``."""
    if task is not None:
        return sorted(p.stem for p in (RECIPES / task).glob("*.json"))
    return sorted(f"{p.parent.name}/{p.stem}" for p in RECIPES.glob("*/*.json"))


def recipe_path(name_or_file: str | Path, task: str) -> tuple[Path, str]:
    """(file, recorded name) of a recipe: a name in ``task``'s folder, a shipped ``task/name``, or a file."""
    text = str(name_or_file)
    for qualified in (f"{task}/{text}", text):  # a name of this task, or one as a run dir records it
        path = RECIPES / f"{qualified}.json"
        if path.parent.parent == RECIPES and path.is_file():  # inside a task folder, never beside or above
            return path, qualified
    if Path(text).is_file():
        return Path(text), text
    if text in RENAMED:
        new_task, new = RENAMED[text].split("/")
        raise FileNotFoundError(f"no recipe {text!r}: recipes are named per task now, it is {new_task}'s {new!r} "
                                f"(vlv/recipes/{new_task}/{new}.json; --recipe {new})")
    raise FileNotFoundError(f"no {task} recipe {text!r}: not a file, nor one of {', '.join(list_recipes(task))}")


def load_recipe(name_or_file: str | Path, task: str) -> dict[str, Any]:
    """A shipped recipe of ``task`` by name, or a JSON file; it must be a recipe of ``task``. Its ``name`` is
    ``task/name`` for a shipped one (unique across tasks), else the path as given."""
    path, name = recipe_path(name_or_file, task)
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"recipe {path} is not valid JSON ({e})") from None
    if not isinstance(recipe, dict) or recipe.get("task") != task:
        raise ValueError(f"recipe {path} is not a {task} recipe (its task: "
                         f"{recipe.get('task') if isinstance(recipe, dict) else None!r})")
    return {"name": name, **recipe}


def section(recipe: dict[str, Any], name: str, cls: type, overrides: dict[str, Any] | None = None,
            **required: Any) -> Any:
    """``cls`` built from the recipe's section ``name``, then ``overrides`` (fields not None), then ``required``.

    Unknown keys in the recipe are an error, so a misspelt setting never goes silently unused. A field whose
    metadata names ``moot_with`` keeps its recipe value only while that other field is not given (else None).
    """
    known = {f.name for f in fields(cls)}
    values = dict(recipe.get(name, {}))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {recipe.get('name')!r}, section {name!r}: unknown fields {', '.join(unknown)}")
    given = {k: v for k, v in {**(overrides or {}), **required}.items() if v is not None and k in known}
    for f in fields(cls):  # a recipe's value that another given field makes moot is unset (None), not applied
        other = f.metadata.get("moot_with")
        if other and given.get(other) is not None and f.name not in given:
            values[f.name] = None
    values.update(given)
    return cls(**values)


def resolved(recipe: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """The recipe as it ran: its name and description with each section's final values (for the run dir)."""
    return {"name": recipe.get("name"), "task": recipe["task"], "description": recipe.get("description"),
            **{k: asdict(v) for k, v in sections.items()}}


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Settings built from what a user gave (a recipe file, flags): a ValueError or TypeError raised while
    building them is about that input, since nothing else has been read yet, so it becomes InvalidInput."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise InvalidInput(str(e)) from None


def load_sections(name_or_file: str | Path, task: str, settings_type: type, settings: dict[str, Any] | None = None,
                  train: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any, Any]:
    """(recipe, settings, loop config) of a training run: the recipe's two sections, each given field on top."""
    from vlv.training.config import TrainConfig

    with user_input():
        recipe = load_recipe(name_or_file, task)
        return (recipe, section(recipe, "settings", settings_type, settings),
                section(recipe, "train", TrainConfig, train))
