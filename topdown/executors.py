"""Where the runs of a command made of many runs (``compare``, ``analyse``) run: ``--executor``.

Every executor opens a pool with one method, ``submit(fn, *args)``, that runs ``fn(task, *args)``
somewhere and returns a ``concurrent.futures.Future``, so the commands schedule their runs the same
way on every engine:

- ``Local(jobs)``: processes on this machine (``jobs.Workers``, ``--jobs N``);
- ``Ray(address)``: each call a Ray task asking for ``cpus_per_run`` CPUs, on a local Ray instance
  or a running cluster (``--address``); a task whose worker died is retried (``max_retries``);
- ``Slurm(folder)``: each call a SLURM job submitted through submitit (logs in ``folder``); a job
  that reaches its time limit or is preempted is requeued.

Ray's and submitit's handles become futures in one place (``_Remote``). A remote call builds its own
task from the command's ``task_factory`` (once per worker process), trains at ``cpus_per_run``
threads and works in the directory the command was started in, so the output directory must be a
file system every worker shares, at the same path. A run directory is locked by the process that
trains it (``lock.py``); the lock goes with a dead process, so a call retried or requeued elsewhere
resumes its run from its last saved epoch. Every run depends only on its own seed, so the results
equal ``--jobs 1``'s at the same threads per process.

``from_args`` builds the executor a command's ``--executor`` options ask for
(``arguments.executor_options``), for any command made of many runs.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from topdown import lock
from topdown.console import muted
from topdown.errors import ConfigError, TopdownError, TrainingError
from topdown.jobs import Workers, check_jobs
from topdown.task import Task

EXTRA = 'pip install "topdown[cluster]"'
AGAIN = "finished runs are kept and unfinished ones resume from their last epoch: run the same command again"
LOCAL_TIME_MIN = 7 * 24 * 60  # submitit's local jobs end after 2 minutes unless told otherwise


class Executor(ABC):
    """Where a command's runs run. ``check`` refuses what cannot work, in one line, before anything
    runs; ``open`` is a context manager whose value has ``submit(fn, *args) -> Future``."""

    @abstractmethod
    def check(self, task_factory: Callable[[], Task] | None) -> None: ...

    @abstractmethod
    def open(self, task: Task, task_factory: Callable[[], Task] | None, calls: int | None = None): ...


@dataclass(frozen=True)
class Local(Executor):
    """``jobs`` processes on this machine (one: this process); ``calls``, where known, caps them."""

    jobs: int = 1

    def check(self, task_factory: Callable[[], Task] | None) -> None:
        check_jobs(self.jobs, task_factory)

    def open(self, task: Task, task_factory: Callable[[], Task] | None, calls: int | None = None) -> Workers:
        return Workers(task, self.jobs if calls is None else min(self.jobs, max(calls, 1)), task_factory)


def _check_remote(cpus_per_run: int, task_factory: Callable[[], Task] | None) -> None:
    if cpus_per_run < 1:
        raise ConfigError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
    if task_factory is None:
        raise ConfigError("runs in other processes need a task_factory: each process builds its own task")


@dataclass(frozen=True)
class Ray(Executor):
    """Each call a Ray task on ``cpus_per_run`` CPUs (and as many torch threads): on the cluster at
    ``address`` (``HOST:PORT``, ``auto``, ``ray://HOST:PORT``), else on a Ray instance this command
    starts on this machine (or the one ``ray.init`` already started in this process)."""

    address: str | None = None
    cpus_per_run: int = 1
    max_retries: int = 3  # a task whose worker process or node died runs again, resuming its run

    def check(self, task_factory: Callable[[], Task] | None) -> None:
        _check_remote(self.cpus_per_run, task_factory)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every run's progress line, not "[repeated 6x]"
        _extra("ray")
        if self.address and self.address != "auto":
            _reachable(self.address)

    def open(self, task: Task, task_factory: Callable[[], Task] | None, calls: int | None = None):
        self.check(task_factory)
        return _RayWorkers(self, task_factory)


@dataclass(frozen=True)
class Slurm(Executor):
    """Each call a SLURM job (``sbatch``, through submitit) with ``cpus_per_run`` CPUs, its logs and
    submitit's files in ``folder``; ``partition``, ``time_min`` (else the partition's default) and
    ``options`` (further sbatch options, e.g. ``{"account": "proj", "gres": "gpu:1"}``).
    ``local``: each job a process on this machine instead (submitit's local executor), to try the
    same path without a cluster."""

    folder: Path
    partition: str | None = None
    time_min: int | None = None
    cpus_per_run: int = 1
    options: dict[str, str] = field(default_factory=dict)
    local: bool = False

    def check(self, task_factory: Callable[[], Task] | None) -> None:
        _check_remote(self.cpus_per_run, task_factory)
        if self.time_min is not None and self.time_min < 1:
            raise ConfigError(f"--slurm-time must be at least 1 minute, got {self.time_min}")
        _extra("submitit")
        if not self.local and shutil.which("sbatch") is None:
            raise ConfigError(
                "--executor slurm: no sbatch on PATH (run the command on a SLURM login node, or add "
                "--slurm-local to run each job as a process on this machine)"
            )

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit's ``SlurmExecutor`` parameters: what each job's sbatch script asks for."""
        wanted = {"partition": self.partition, "time": self.time_min, "cpus_per_task": self.cpus_per_run}
        return {
            "job_name": "topdown",
            **{k: v for k, v in wanted.items() if v is not None},
            **({"additional_parameters": dict(self.options)} if self.options else {}),
        }

    def open(self, task: Task, task_factory: Callable[[], Task] | None, calls: int | None = None):
        self.check(task_factory)
        return _SlurmWorkers(self, task_factory)


def _extra(module: str):
    """``module``, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--executor needs {module}, which is not installed: {EXTRA}") from None


def _reachable(address: str) -> None:
    """Refuse an address nothing answers at now, in one line (Ray itself would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected HOST:PORT (or auto, or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"--address {address}: cannot reach it ({e.strerror or e}); start the cluster (ray start --head) "
            "or check the address"
        ) from None


def chosen(executor: Executor | None, jobs: int, task_factory: Callable[[], Task] | None) -> Executor:
    """The executor a command runs its runs with: ``executor``, else ``jobs`` local processes;
    checked now, before anything trains."""
    if executor is not None and jobs != 1:
        raise ConfigError("jobs is the local executor's: give Local(jobs) as the executor instead")
    executor = executor if executor is not None else Local(jobs)
    executor.check(task_factory)
    return executor


def in_parallel(
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    task: Task,
    executor: Executor,
    task_factory: Callable[[], Task] | None,
) -> list[Any]:
    """``[fn(task, *args) for args in calls]``, each where ``executor`` runs it."""
    with executor.open(task, task_factory, calls=len(calls)) as workers:
        futures = [workers.submit(fn, *args) for args in calls]
        return [f.result() for f in futures]


# -- in a Ray worker or a SLURM job ---------------------------------------------------------------

_built: tuple[str, Task] | None = None  # the task this worker process built last, under its pool's key


@dataclass(frozen=True)
class _Failed:
    """A ``TopdownError`` a remote call raised, brought back whole (engines wrap exceptions in their
    own, with a traceback in the message): the command reports it in one line, as for local runs."""

    error: TopdownError


@dataclass(frozen=True)
class _Call:
    """``fn(task, *args)`` in a worker process: the task built from ``task_factory`` (once per pool
    and process: a Ray worker runs many calls), ``threads`` torch threads, in ``cwd``. Every run
    directory it locked is let go at the end, however it ended, since the process may go on to
    other work. ``checkpoint``: submitit requeues a job that timed out with this same call,
    which resumes its run."""

    key: str
    task_factory: Callable[[], Task]
    threads: int
    cwd: str
    fn: Callable[..., Any]
    args: tuple

    def __call__(self) -> Any:
        global _built
        torch.set_num_threads(self.threads)
        try:
            try:
                os.chdir(self.cwd)
            except OSError:
                raise ConfigError(
                    f"{self.cwd} is not there on {socket.gethostname()}: the workers must share the "
                    "directory the command was started in, at the same path"
                ) from None
            if _built is None or _built[0] != self.key:
                with muted():  # the command built the same task and said what there was to say
                    _built = (self.key, self.task_factory())
            return self.fn(_built[1], *self.args)
        except TopdownError as e:
            return _Failed(e)
        finally:
            lock.release_all()

    def checkpoint(self) -> Any:
        return importlib.import_module("submitit.helpers").DelayedSubmission(self)


def _ray_call(call: _Call) -> Any:
    return call()


# -- in the command's process ---------------------------------------------------------------------


def _waited(wait: Callable[[], Any]) -> Future:
    """A ``concurrent.futures.Future`` of what ``wait()`` returns (an engine's blocking get), set by
    a thread of its own, so that ``as_completed`` sees each call finish when it does."""
    future: Future = Future()

    def waiting() -> None:
        try:
            outcome = wait()
        except BaseException as e:  # noqa: BLE001 - handed to the future's reader
            future.set_exception(e)
            return
        if isinstance(outcome, _Failed):
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome)

    threading.Thread(target=waiting, daemon=True).start()
    return future


class _Remote:
    """A pool whose calls run in an engine's worker processes. Leaving it on an error (Ctrl-C
    included) cancels every call not finished: a run stopped so resumes from its last saved epoch
    when the command runs again."""

    def __init__(self, threads: int, task_factory: Callable[[], Task]):
        self.call = functools.partial(_Call, uuid.uuid4().hex, task_factory, threads, os.getcwd())
        self.started: list[tuple[Future, Callable[[], None]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        wait, cancel = self._launch(self.call(fn, args))
        future = _waited(wait)
        self.started.append((future, cancel))
        return future

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            for future, cancel in self.started:
                if not future.done():
                    cancel()
        self._close()

    def _launch(self, call: _Call) -> tuple[Callable[[], Any], Callable[[], None]]:
        """Start ``call``; its blocking result, and how to cancel it."""
        raise NotImplementedError

    def _close(self) -> None:
        pass


class _RayWorkers(_Remote):
    def __init__(self, spec: Ray, task_factory: Callable[[], Task]):
        super().__init__(spec.cpus_per_run, task_factory)
        self.ray = _extra("ray")
        self.ours = not self.ray.is_initialized()
        if self.ours:
            try:
                self.ray.init(address=spec.address, include_dashboard=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(
                    f"--executor ray: cannot start or reach Ray: {str(e).splitlines()[0]}"
                ) from None
        self.remote = self.ray.remote(_ray_call).options(
            num_cpus=spec.cpus_per_run, max_retries=spec.max_retries
        )

    def _launch(self, call: _Call):
        ref = self.remote.remote(call)
        return functools.partial(self._result, ref), functools.partial(self.ray.cancel, ref, force=True)

    def _result(self, ref) -> Any:
        lost = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except (lost.WorkerCrashedError, lost.NodeDiedError, lost.OutOfMemoryError) as e:
            raise TrainingError(
                f"a Ray worker ended abruptly, as often as Ray retries a task ({type(e).__name__}); {AGAIN}"
            ) from None

    def _close(self) -> None:
        if self.ours:
            self.ray.shutdown()


class _SlurmWorkers(_Remote):
    def __init__(self, spec: Slurm, task_factory: Callable[[], Task]):
        super().__init__(spec.cpus_per_run, task_factory)
        self.submitit = submitit = _extra("submitit")
        if spec.local:
            self.executor = submitit.LocalExecutor(spec.folder)
            self.executor.update_parameters(timeout_min=spec.time_min or LOCAL_TIME_MIN)
        else:
            self.executor = submitit.SlurmExecutor(spec.folder)
            self.executor.update_parameters(**spec.sbatch_parameters())

    def _launch(self, call: _Call):
        job = self.executor.submit(call)
        return functools.partial(self._result, job), job.cancel

    def _result(self, job) -> Any:
        try:
            return job.result()
        except self.submitit.core.utils.FailedJobError:
            raise  # a Python error in the run: its traceback is in the message
        except self.submitit.core.utils.UncompletedJobError:
            raise TrainingError(
                f"SLURM job {job.job_id} ended without a result (killed, cancelled or out of time; its "
                f"log: {job.paths.stderr}); {AGAIN}"
            ) from None


def from_args(args, out: Path, task_factory: Callable[[], Task]) -> Executor:
    """The executor the ``--executor`` options of a command ask for (``arguments.executor_options``),
    its SLURM files under ``out/slurm``; checked before anything runs."""
    given = {  # option: whether it was given, the executors that read it
        "--jobs": (args.jobs != 1, "local"),
        "--address": (args.address is not None, "ray"),
        "--cpus-per-run": (args.cpus_per_run is not None, "ray slurm"),
        "--slurm-partition": (args.slurm_partition is not None, "slurm"),
        "--slurm-time": (args.slurm_time is not None, "slurm"),
        "--slurm-option": (bool(args.slurm_option), "slurm"),
        "--slurm-local": (args.slurm_local, "slurm"),
    }
    if wrong := [
        o for o, (there, readers) in given.items() if there and args.executor not in readers.split()
    ]:
        raise ConfigError(f"{', '.join(wrong)}: not an option of --executor {args.executor}")
    cpus = int(os.environ.get("OMP_NUM_THREADS") or 1) if args.cpus_per_run is None else args.cpus_per_run
    if args.executor == "local":
        executor: Executor = Local(args.jobs)
    elif args.executor == "ray":
        executor = Ray(args.address, cpus)
    else:
        options = {}
        for text in args.slurm_option:
            key, sep, value = text.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"--slurm-option {text}: expected KEY=VALUE (an sbatch option, e.g. account=proj)"
                )
            options[key] = value
        executor = Slurm(
            out / "slurm", args.slurm_partition, args.slurm_time, cpus, options, args.slurm_local
        )
    executor.check(task_factory)
    return executor
