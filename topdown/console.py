"""What topdown tells the user on stderr, one line each: progress (``say``) and warnings (``warn``),
for what is worth knowing but not worth stopping for. Errors are ``errors.py``'s exceptions.

Only rank 0 of a data-parallel run speaks. Several runs training at once (``--jobs``) begin
their lines with the run's name (``progress_label``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

from topdown import distributed

_muted = False
_label: ContextVar[str] = ContextVar("progress_label", default="")


def warn(message: str) -> None:
    """``topdown: message`` on stderr, once per run (rank 0 of a data-parallel run)."""
    if distributed.is_writer() and not _muted:
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


@contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Begin the progress lines of the enclosed training with ``label``: which run they belong
    to, when a comparison trains several at once."""
    token = _label.set(f"{label}: ")
    try:
        yield
    finally:
        _label.reset(token)


def label() -> str:
    """The enclosing ``progress_label``'s prefix (``""`` outside one), for a progress bar's title."""
    return _label.get()


def say(message: str) -> None:
    """A progress line on stderr (rank 0 only), kept clear of the progress bars. The line and
    its newline go out in one write, so lines of parallel workers do not run into each other."""
    if distributed.is_writer():
        tqdm.write(f"{_label.get()}{message}\n", file=sys.stderr, end="")
