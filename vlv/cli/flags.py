"""Argument types and flags built from config dataclasses: each setting is declared once, as a field whose
metadata holds its help text (peft's ``field(metadata={"help": ...})``), and becomes a flag here.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal


def _writable(text: str, is_dir: bool | None) -> Path:
    from vlv.checks import check_out
    from vlv.errors import UserError

    try:
        return check_out(text, flag="", is_dir=is_dir)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def writable_dir(text: str) -> Path:
    """argparse type: a folder we can create (or that exists) and write into; nothing is created yet, so a
    command that refuses its other inputs leaves no folder behind."""
    return _writable(text, is_dir=True)


def writable_file(text: str) -> Path:
    """argparse type: a file we can write (its folder exists or can be made); written later, atomically."""
    return _writable(text, is_dir=False)


def writable_path(text: str) -> Path:
    """argparse type: a file or a folder we can write (the command decides which)."""
    return _writable(text, is_dir=None)


# --------------------------------------------------------------------------- flags from config dataclasses
def _none_or(parse):
    def parse_optional(text: str):
        return None if text.lower() == "none" else parse(text)
    return parse_optional


def _number(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    return parse


def _positive(kind: type):
    parse = _number(kind)

    def parse_positive(text: str):
        value = parse(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return value
    return parse_positive


positive_int, positive_float = _positive(int), _positive(float)


def _field_kwargs(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: numbers, strings, choices (Literal), tuples, optionals, bools."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is Literal:
        return {"choices": list(args)}
    if typing.get_origin(hint) is tuple:
        return {"type": _number(args[0]), "nargs": "+" if args[-1] is Ellipsis else len(args)}
    parse = _number(hint) if hint in (int, float) else str
    return {"type": _none_or(parse) if optional else parse}


def shown(value: Any) -> str:
    """A default as the command line would take it: none, on/off for a switch, a list space-separated."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(shown(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class RecipeSection:
    """One section of the recipe a command trains with by default: its values are the defaults ``--help`` shows."""

    name: str  # as runs record it: task/name
    values: dict[str, Any]


def recipe_section(task: str, section: str, recipe: str = "shapes") -> RecipeSection:
    """Section ``section`` of the shipped recipe ``task/recipe``, read from its JSON (cheap: no torch)."""
    from vlv.training.recipes import load_recipe

    loaded = load_recipe(recipe, task)
    return RecipeSection(loaded["name"], dict(loaded.get(section, {})))


def _field_default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def add_fields(p: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (),
               defaults: dict[str, Any] | None = None, prefix: str = "", recipe: RecipeSection | None = None) -> None:
    """One flag per field of the config dataclass ``cls``, its help from the field's metadata.

    Fields without a default are required flags (unless ``defaults`` gives one); the others default to None,
    meaning "the recipe's value", so a flag overrides a single field of the recipe. The help shows the value a
    run takes when the flag is not given: the default ``recipe`` section's, else the field's own. A ``prefix``
    names one of several sections of the same class (``--vae-steps``, ``--unet-steps``; read back with ``given``).
    """
    hints = typing.get_type_hints(cls)
    group = p.add_argument_group(title)
    for f in fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        kwargs = _field_kwargs(hints[f.name])
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        required = f.default is MISSING and f.default_factory is MISSING and f.name not in (defaults or {})
        help_text = f.metadata.get("help", "")
        if not required:
            if f.name in (defaults or {}):
                help_text += f" (default: {shown(defaults[f.name])})"
            elif recipe is not None and f.name in recipe.values:
                help_text += f" (default: {shown(recipe.values[f.name])} from recipe {recipe.name})"
            else:
                help_text += f" (default: {shown(_field_default(f))})"
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        group.add_argument(f"--{prefix}-{flag[2:]}" if prefix else flag, dest=_dest(f.name, prefix),
                           required=required, default=(defaults or {}).get(f.name), help=help_text, **kwargs)


def _dest(name: str, prefix: str) -> str:
    return f"{prefix}_{name}" if prefix else name


def given(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` (flags of ``prefix``) set on the command line (None: not given)."""
    return {f.name: getattr(args, _dest(f.name, prefix)) for f in fields(cls)
            if getattr(args, _dest(f.name, prefix), None) is not None}


def add_parquet_columns(p: argparse.ArgumentParser) -> None:
    """Parquet column names for the data commands (training reads them from its settings)."""
    p.add_argument("--image-column", default="image", help="parquet data: the image column")
    p.add_argument("--caption-column", default="caption", help="parquet data: the caption column")


def recipe_arg(p: argparse.ArgumentParser, task: str, default: str = "shapes") -> None:
    """--recipe: a name in the task's folder (listed from it, so the help never goes stale) or a JSON file."""
    from vlv.training.recipes import list_recipes

    p.add_argument("--recipe", default=default, help=f"how this stage trains: a recipe of vlv/recipes/{task}/ "
                   f"({', '.join(list_recipes(task))}) or a JSON file; the flags below override single fields, "
                   f"and the defaults they show are those of recipe {default}")


def gpu_memory_arg(p: argparse.ArgumentParser) -> None:
    """--gpu-memory: the GiB a plan of the command's step is checked against (vlv.training.plan)."""
    p.add_argument("--gpu-memory", type=positive_float, default=None, metavar="GIB",
                   help="check the plan of a step (vlv plan) against this many GiB per GPU before anything loads, "
                        "and stop in one line when it does not fit (default: the GPU found; on a CPU, no check)")


def command_line() -> str:
    return "vlv " + " ".join(sys.argv[1:])


class _SkipBad(argparse.Action):
    """--on-bad-image skip|fail, stored as the bool ``skip_bad`` the inference jobs take."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.skip_bad = values == "skip"


def add_images(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The image inputs of an inference command: files or folders, and what to do with an unreadable one.

    ``--on-bad-image`` is the training commands' flag; here it stops by default, since every file was named by
    the user (a training set skips a few bad images among many). ``--skip-bad`` is its old spelling, hidden."""
    if positional:
        p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], action=_SkipBad, dest="skip_bad", default=False,
                   help="an unreadable image file: skip it (counted) or stop naming it (default: fail)")
    p.add_argument("--skip-bad", action="store_true", dest="skip_bad", help=argparse.SUPPRESS)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """How images are drawn: the samplers, steps and guidance every drawing command shares (vlv.config)."""
    from vlv.config import DEFAULT_GUIDANCE, DEFAULT_STEPS, SAMPLERS

    p.add_argument("--sampler", choices=list(SAMPLERS), default="fast",
                   help="; ".join(f"{name}: {kind}, {DEFAULT_STEPS[name]} steps" for name, kind in SAMPLERS.items())
                   + " (SD3/FLUX decoders: their FlowMatchEuler at these steps)")
    p.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (the paper's; the shipped weights are measured at it)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the sampler's, "
                   + ", ".join(f"{name} {n}" for name, n in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="noise seed")


PRECISION_CHOICES = ("fp32", "bf16", "fp16")  # vlv.modeling.PRECISIONS, named here so the CLI loads no torch


def add_device_args(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    """Where and in what precision an inference command runs (checked by the library before anything loads)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="the models' dtype, loaded straight into it (default: bf16 on a GPU that computes it "
                        "natively, fp32 otherwise)")
    if batch_size:
        p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (default 64)")
