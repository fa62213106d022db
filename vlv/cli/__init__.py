"""The ``vlv`` command line: thin argparse front ends over the library, one subcommand per job.

User mistakes (bad arguments, inputs, missing folders: :class:`vlv.errors.UserError`) print one line and exit 2;
anything else is a bug and shows its traceback (``vlv --quiet``: one line, exit 1). VLV_DEBUG=1 shows every
traceback. The parser imports no torch (flags come from the config
dataclasses), so ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from vlv.cli import data, demo, infer, official, plan, train
from vlv.errors import NonFiniteLoss, UserError

# A user's mistake: an input vlv checked (UserError), or a path the system refused; any other error is a bug.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from vlv import __version__

    parser = Parser(prog="vlv", description="Vision-Language-Vision auto-encoder.")
    parser.add_argument("--version", action="version", version=f"vlv {__version__}")
    parser.add_argument("--quiet", dest="quiet_errors", action="store_true",
                        help="before the command: an unexpected error (a bug) prints one line and exits 1, "
                             "not a traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, train, plan, infer, official, demo):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("VLV_DEBUG"))  # every error raises, with its traceback
    try:
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
        elif args.quiet_errors:
            status, text = 1, (f"vlv: internal error: {type(e).__name__}: {one_line(e)} (run without --quiet for "
                               "the traceback)")
        else:  # a bug: its traceback is what a report needs
            status, text = 1, "".join(traceback.format_exception(e)).rstrip()
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
