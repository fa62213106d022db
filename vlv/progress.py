"""What vlv prints while it works: its own progress bars, and nothing from the libraries it loads through.

Every bar vlv draws is :func:`tqdm` from here (``tests/test_layout.py`` checks), so :func:`no_bars` turns them all
off for a block: the command line's ``--quiet`` runs the whole command inside it, and a library user can too.
:func:`quiet_library` wraps each load and save vlv makes through diffusers and transformers: their bars
("Loading pipeline components", "Loading weights", "Writing model shards") are off during that call and restored
after, so a user's own settings and their own calls are untouched. Their warnings stay on: a load that warns
(weights not initialised, ...) is telling the user something.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_bars = True  # off inside no_bars()


def bars_on() -> bool:
    """Whether vlv's progress bars draw (False inside :func:`no_bars`)."""
    return _bars


@contextlib.contextmanager
def no_bars() -> Iterator[None]:
    """No vlv progress bar draws inside this block (the CLI's ``--quiet``)."""
    global _bars
    before, _bars = _bars, False
    try:
        yield
    finally:
        _bars = before


def tqdm(*args: Any, **kwargs: Any):
    """``tqdm.auto.tqdm`` as called, disabled inside :func:`no_bars`."""
    from tqdm.auto import tqdm as bar

    if not _bars:
        kwargs["disable"] = True
    return bar(*args, **kwargs)


def clear_bars() -> None:
    """Close every open bar and wipe its line, so an error message that follows stands alone on its line."""
    from tqdm import tqdm as bar

    for b in list(getattr(bar, "_instances", ())):
        b.leave = False
        b.close()


def _no_bar(factory, args: tuple, kwargs: dict[str, Any]):
    """A transformers tqdm hook: the bar it would have drawn, disabled."""
    return factory(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_library() -> Iterator[None]:
    """diffusers' and transformers' bars off for one of vlv's calls into them (a load, a save_pretrained)."""
    # diffusers keeps one switch for its bars; transformers takes a hook and hands back the previous one, which
    # leaves huggingface_hub's own switch (that transformers' disable_progress_bar would flip too) alone.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    previous_hook = transformers_logging.set_tqdm_hook(_no_bar)
    try:
        yield
    finally:
        transformers_logging.set_tqdm_hook(previous_hook)
        if diffusers_bars:
            diffusers_logging.enable_progress_bar()

