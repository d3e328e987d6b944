"""An exclusive lock on a run directory while one process writes the run in it.

A second process writing the same run (a command started again while the first still runs)
would interleave its records and checkpoints with the first one's: it is refused instead. The
lock (``flock`` on the directory itself) goes with the process however it ends, so a ``kill -9``
leaves nothing to clean up. Readers take no lock.
"""

from __future__ import annotations

import os
from pathlib import Path

from topdown.errors import TopdownError

try:
    import fcntl
except ImportError:  # not on Windows: no directory locks there
    fcntl = None

# run directories this process writes: resolved path -> the descriptor holding the lock
_claimed: dict[str, int] = {}


def claim(path: Path) -> None:
    """Lock ``path`` for this process until ``release`` or the process ends. Claiming a directory
    this process already holds does nothing; so does a missing directory (nothing to share yet)
    or a file system without locks."""
    key = str(path.resolve())
    if fcntl is None or key in _claimed or not path.is_dir():
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return  # unreadable: the writes that follow say what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TopdownError(
            f"{path} is in use: another process is training the run there; let it finish (or stop it), "
            "or choose another output directory"
        ) from None
    except OSError:
        os.close(fd)
        return
    _claimed[key] = fd


def release(path: Path) -> None:
    """Let other processes write the run in ``path`` (it is complete, or stopped on an error)."""
    if (fd := _claimed.pop(str(path.resolve()), None)) is not None:
        os.close(fd)


def release_all() -> None:
    """Let go of every run directory this process holds: a worker process that goes on to other
    work after a run stopped on an error the run could not record (Ctrl-C, a bug) must not keep
    that run from being resumed elsewhere."""
    for key in list(_claimed):
        os.close(_claimed.pop(key))
