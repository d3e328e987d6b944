"""``compare``/``analyse --jobs N``: independent runs in N processes on one machine.

A ``Task`` holds closures and data and is not sent between processes: each worker builds its
own from ``task_factory`` (a picklable callable, e.g. ``functools.partial`` of a top-level
function) and divides the machine's threads with the other workers (with ``OMP_NUM_THREADS`` set,
each worker takes that many instead). Every run's randomness
is a function of its own seed, so the results equal those of one process at the same thread
count (a different thread count can change the last bits of a CPU result)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from topdown.console import muted, warn
from topdown.errors import ConfigError, TrainingError
from topdown.task import Task

_worker_task: Task | None = None


def _start_worker(task_factory: Callable[[], Task], threads: int, parent: int) -> None:
    global _worker_task
    threading.Thread(target=_end_with, args=(parent,), daemon=True, name="topdown-parent-watch").start()
    torch.set_num_threads(threads)
    with muted():  # the main process built the same task and said what there was to say
        _worker_task = task_factory()


def _end_with(parent: int, every: float = 1.0) -> None:
    """End this worker once process ``parent`` (the command) is gone, killed from outside: a pool's
    workers outlive a killed parent, and one training on would hold its run's lock against the
    command run again ("is in use"). The run it leaves resumes from its last epoch then."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(_worker_task, *args)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or ``taskset``'s limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_jobs(jobs: int, task_factory: Callable[[], Task] | None) -> None:
    """Refuse a worker count that cannot work; callers that train before they start workers call it first."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and task_factory is None:
        raise ConfigError("jobs > 1 needs a task_factory: each worker process builds its own task")


class Workers:
    """``submit(fn, *args)`` runs ``fn(task, *args)`` in one of ``jobs`` worker processes and
    returns a future; with ``jobs`` == 1 it runs at once, in this process, and returns a finished
    one. Leaving the block on an error cancels the calls not yet started (running ones finish,
    so their runs are complete and kept); leaving it on Ctrl-C also ends the running ones, and the
    workers end within a second of the command itself being killed (``_end_with``). A
    worker killed from outside (e.g. by the kernel's out-of-memory killer) ends the pool: that
    is a one-line ``TrainingError``, since every unfinished run resumes from its last epoch
    when the command is run again."""

    def __init__(self, task: Task, jobs: int, task_factory: Callable[[], Task] | None):
        check_jobs(jobs, task_factory)
        self.task, self.jobs, self.task_factory = task, jobs, task_factory
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Workers:
        if self.jobs > 1:
            if self.jobs > (cpus := usable_cpus()):
                warn(
                    f"--jobs {self.jobs} is more than the {cpus} usable CPUs: the workers take turns on the "
                    "cores, which costs throughput (six one-thread trainings on two cores did a fifth less "
                    "work in all than two; bench/RESULTS.md)"
                )
            threads = (
                max(1, torch.get_num_threads() // self.jobs)
                if "OMP_NUM_THREADS" not in os.environ
                else torch.get_num_threads()
            )
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
            self.pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=context,
                initializer=_start_worker,
                initargs=(self.task_factory, threads, os.getpid()),
            )
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.pool is not None:
            if isinstance(error, KeyboardInterrupt):  # Ctrl-C: stop now, not after the runs in progress
                self._terminate_workers()
            self.pool.shutdown(wait=True, cancel_futures=error is not None)
        if isinstance(error, BrokenProcessPool):
            raise TrainingError(
                "a worker process ended abruptly (killed from outside, e.g. for want of memory); finished "
                "runs are kept and unfinished ones resume from their last epoch: run the same command again"
            ) from error

    def _terminate_workers(self) -> None:
        """End every worker at once; a run in progress resumes from its last saved epoch."""
        if hasattr(self.pool, "terminate_workers"):  # Python >= 3.14
            self.pool.terminate_workers()
            return
        for process in list(
            getattr(self.pool, "_processes", {}).values()
        ):  # earlier: the pool's own record of its workers
            process.terminate()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(_call, fn, args)
        done: Future = Future()
        try:
            done.set_result(fn(self.task, *args))
        except Exception as e:  # noqa: BLE001 - handed to the future's reader, as a pool would; Ctrl-C is not
            done.set_exception(e)
        return done
