"""Recipes: how a stage trains, as named data files (``vlv/recipes/<name>.json``), not as constants in code.

A recipe holds a ``task`` (stage1, stage2, lm, teacher, demo), a ``description``, and the sections its task
reads: ``train`` (the loop's :class:`vlv.training.loop.TrainConfig` fields) and ``settings`` (the task's method
settings). Every training command takes ``--recipe NAME|FILE`` and lets flags override single fields; the run
dir saves the resolved recipe beside its weights.
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


def list_recipes(task: str | None = None) -> list[str]:
    """Names of the shipped recipes, optionally only those of one task."""
    names = sorted(p.stem for p in RECIPES.glob("*.json"))
    return [n for n in names if task is None or json.loads((RECIPES / f"{n}.json").read_text())["task"] == task]


def load_recipe(name_or_file: str | Path, task: str) -> dict[str, Any]:
    """A shipped recipe by name, or a JSON file; it must be a recipe of ``task``."""
    path = RECIPES / f"{name_or_file}.json"
    if not path.is_file():
        path = Path(name_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe {str(name_or_file)!r}: not a file, nor one of "
                                    f"{', '.join(list_recipes(task))}")
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"recipe {path} is not valid JSON ({e})") from None
    if not isinstance(recipe, dict) or recipe.get("task") != task:
        raise ValueError(f"recipe {path} is not a {task} recipe (its task: "
                         f"{recipe.get('task') if isinstance(recipe, dict) else None!r})")
    return {"name": str(name_or_file), **recipe}


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
