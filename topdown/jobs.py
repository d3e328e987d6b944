"""``compare``/``analyse --jobs N``: independent runs in N processes on one machine.

A ``Task`` holds closures and data and is not sent between processes: each worker builds its
own from ``task_factory`` (a picklable callable, e.g. ``functools.partial`` of a top-level
function) and divides the machine's threads with the other workers. Every run's randomness
is a function of its own seed, so the results equal those of one process at the same thread
count (a different thread count can change the last bits of a CPU result)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from .errors import ConfigError
from .task import Task

_worker_task: Task | None = None


def _start_worker(task_factory: Callable[[], Task], threads: int) -> None:
    global _worker_task
    torch.set_num_threads(threads)
    _worker_task = task_factory()


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(_worker_task, *args)


def in_parallel(fn: Callable[..., Any], calls: Sequence[tuple], task: Task, jobs: int,
                task_factory: Callable[[], Task] | None) -> list[Any]:
    """``[fn(task, *args) for args in calls]``, in ``jobs`` worker processes when ``jobs`` > 1."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1 or len(calls) <= 1:
        return [fn(task, *args) for args in calls]
    if task_factory is None:
        raise ConfigError("jobs > 1 needs a task_factory: each worker process builds its own task")
    threads = max(1, torch.get_num_threads() // jobs) if "OMP_NUM_THREADS" not in os.environ else torch.get_num_threads()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(task_factory, threads)) as pool:
        return list(pool.map(_call, [fn] * len(calls), calls))
