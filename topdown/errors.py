"""Errors the command line reports as one line (and a non-zero exit) instead of a traceback, and
warnings, one line each, for what is worth knowing but not worth stopping for."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

_muted = False


def warn(message: str) -> None:
    """``topdown: message`` on stderr, once per run (rank 0 of a data-parallel run)."""
    from topdown import distributed  # here, not at the top: distributed imports this module

    if distributed.speaks() and not _muted:
        print(f"topdown: {message}", file=sys.stderr)


@contextmanager
def muted() -> Iterator[None]:
    """No warnings inside: a ``--jobs`` worker building the task the main process has already
    built (and warned about) says nothing new."""
    global _muted
    before, _muted = _muted, True
    try:
        yield
    finally:
        _muted = before


class TopdownError(Exception):
    """Base class: anything the user can fix (bad input, bad config, a diverged stage)."""


class DataError(TopdownError):
    """A corpus or data file is missing, corrupt or inconsistent."""


class ConfigError(TopdownError):
    """A configuration key or value does not fit the task or the model."""


class BlockError(TopdownError):
    """The declared blocks do not partition the model's parameters."""


class TrainingError(TopdownError):
    """A stage could not be trained (for example its loss became NaN)."""
