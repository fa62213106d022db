"""Recipes: how a stage trains, as named data files (``vlv/recipes/<name>.json``), not as constants in code.

A recipe holds a ``task`` (stage1, stage2, lm, teacher, demo), a ``description``, and the sections its task
reads: ``train`` (the loop's :class:`vlv.training.loop.TrainConfig` fields) and ``settings`` (the task's method
settings). Every training command takes ``--recipe NAME|FILE`` and lets flags override single fields; the run
dir saves the resolved recipe beside its weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

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

    Unknown keys in the recipe are an error, so a misspelt setting never goes silently unused.
    """
    known = {f.name for f in fields(cls)}
    values = dict(recipe.get(name, {}))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {recipe.get('name')!r}, section {name!r}: unknown fields {', '.join(unknown)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in known})
    values.update(required)
    return cls(**values)


def resolved(recipe: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """The recipe as it ran: its name and description with each section's final values (for the run dir)."""
    return {"name": recipe.get("name"), "task": recipe["task"], "description": recipe.get("description"),
            **{k: asdict(v) for k, v in sections.items()}}
