"""Errors a command reports in one line (no traceback); importing this module costs nothing (no torch)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the run stopped, keeping its last good checkpoint."""
