"""The ``vlv`` command line: thin argparse front ends over the library, one subcommand per job.

Every error is one line ``vlv: error: ...``: a user's mistake (bad arguments, inputs, missing folders:
:class:`vlv.errors.UserError`) exits 2, anything else is a bug and exits 1, naming ``--debug``. ``--debug`` (or
VLV_DEBUG=1) shows every error's traceback instead. ``--quiet`` (before or after the command) draws no progress
bars. The parser imports no torch (flags come from the config dataclasses), so ``--help`` and argument errors
are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

from vlv.cli import data, demo, evaluate, infer, official, plan, train
from vlv.errors import NonFiniteLoss, UserError

# A user's mistake: an input vlv checked (UserError), or a path the system refused; any other error is a bug.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
QUIET_HELP = "no progress bars"
DEBUG_HELP = "show an error's traceback, not one line (also VLV_DEBUG=1)"


def states_default(help_text: str) -> bool:
    """Whether a help text says its option's default ("(default: 64)", "default: the run's")."""
    return "(default" in help_text or "default:" in help_text


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help (as argparse's ArgumentDefaultsHelpFormatter), unless its help text
    states it already; never for an on/off switch or a None default, whose meaning the help text says."""

    @staticmethod
    def _appends_default(action: argparse.Action) -> bool:
        takes_value = action.nargs != 0 and (action.option_strings or action.nargs in ("?", "*"))
        return (bool(takes_value) and not action.required and not states_default(action.help or "")
                and action.default not in (None, argparse.SUPPRESS))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return (text + " (default: %(default)s)").strip() if self._appends_default(action) else text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._appends_default(action):  # argparse shows nothing for an option without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) under one prefix for every command, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"vlv: error: {message}\n")


def commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every runnable command (``vlv caption``, ``vlv train stage1``, ...), depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += commands(sub) or [sub]
    return found


def build_parser() -> argparse.ArgumentParser:
    from vlv import __version__

    parser = Parser(prog="vlv", description="Vision-Language-Vision auto-encoder.")
    parser.add_argument("--version", action="version", version=f"vlv {__version__}")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, train, plan, infer, official, demo, evaluate):
        group.register(sub)
    for command in commands(parser):  # also after the command; SUPPRESS keeps a value given before it
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlv.progress import clear_bars, no_bars

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("VLV_DEBUG", "") not in ("", "0")  # every error raises, with its traceback
    try:
        with no_bars() if args.quiet else contextlib.nullcontext():
            args.func(args)
    except KeyboardInterrupt:
        print("vlv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, USER_ERRORS):  # the user's input: what is wrong with it, in one line
            status, text = 2, f"vlv: error: {one_line(e)}"
        elif isinstance(e, NonFiniteLoss):
            status, text = 1, f"vlv: error: {e}"
        else:  # a bug: one line saying so; --debug shows the traceback a report needs
            status, text = 1, (f"vlv: error: internal error (a bug in vlv): {type(e).__name__}: {one_line(e)}; "
                               "run again with --debug for the traceback")
        clear_bars()
        _release(e)
        print(text, file=sys.stderr)
        return status
    return 0


def _release(error: BaseException) -> None:
    """Free what the error's traceback holds, now: a DataLoader iterator caught in it keeps its workers, which
    ignore SIGTERM (they leave a stop to the trainer), so the exit would wait on them forever. Progress bars
    freed with it close before the message is printed."""
    import gc

    error.__traceback__ = None
    gc.collect()


def one_line(error: BaseException) -> str:
    """The message itself: a DataLoader worker's error arrives wrapped in its worker's traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines) or type(error).__name__
