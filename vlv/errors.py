"""Errors a command reports in one line (no traceback); importing this module costs nothing (no torch).

Only a :class:`UserError` (and a missing or unwritable user path) is a user's mistake; the command line prints
anything else as a traceback, since it is a bug.
"""


class UserError(Exception):
    """Bad input from the user (an argument, a path, a data or weights file): one line, exit status 2."""


class InvalidInput(UserError, ValueError):
    """A value the user gave is unusable. Also a ValueError, so library callers that catch ValueError (and the
    settings dataclasses' ``__post_init__`` contract) keep working."""


class BadImage(InvalidInput):
    """An image file that cannot be read or decoded; the message names the file."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the run stopped, keeping its last good checkpoint."""
