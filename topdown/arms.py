"""The runs behind a fair comparison's arms (``topdown.compare``): what each run is (its name under
``DIR/runs/``, procedure, seed and recipe) and their scheduling over workers.

``seed_runs`` is the one definition of a seed's runs, for the whole comparison (``run_all``) and for a
part of it trained alone (``run_only``: a machine that lives shorter than the whole comparison, or a
second process). Finished runs are read back and unfinished ones resumed; only their summaries are
read (``finished_summary``), so a finished run whose checkpoints were deleted still counts.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any

from topdown.config import RunConfig
from topdown.errors import ConfigError
from topdown.jobs import Workers
from topdown.procedures import planned_models, run_or_resume
from topdown.runs import RunDir
from topdown.schedule import LrSchedule
from topdown.seeds import derive_seed
from topdown.task import Task

ARMS = ("baseline", "cascade", "baseline-equal-epochs", "best-of-k")
FORGETTING = "forgetting"  # the optional arm


def _run(
    task: Task, out: Path, procedure: str, name: str, seed: int, config: RunConfig, preset: str | None, device
) -> dict[str, Any]:
    """One run of the comparison, ``out/runs/name`` (a worker's unit of work); only its summary is read."""
    return run_or_resume(
        procedure,
        task,
        out / "runs" / name,
        config=config,
        seed=seed,
        preset=preset,
        device=device,
        weights_needed=False,
    )


def models_trained(cascade: dict[str, Any]) -> int:
    """How many models a finished cascade trained (every candidate of every stage, its baseline
    included): the k of its best-of-k control."""
    return sum(max(1, len(st["candidates"])) for st in cascade["stages"])


def cascade_run(seed: int | str) -> str:
    """The name of seed ``seed``'s cascade under ``runs/`` (its stage 0 is the baseline arm);
    with ``"*"``, like ``forget_run``, a glob of every seed's."""
    return f"cascade-seed{seed}"


def equal_run(seed: int) -> str:
    """The name of seed ``seed``'s equal-epochs baseline under ``runs/``."""
    return f"equal-epochs-seed{seed}"


def extra_run(seed: int, j: int) -> str:
    """The name of best-of-k's j-th fresh baseline (j >= 1) for seed ``seed`` under ``runs/``."""
    return f"baseline-seed{seed}-extra{j}"


def forget_run(seed: int | str) -> str:
    """The name of seed ``seed``'s forgetting run under ``runs/``."""
    return f"forget-seed{seed}"


def extra_seed(seed: int, j: int) -> int:
    """The seed of best-of-k's j-th fresh baseline for comparison seed ``seed``."""
    return derive_seed(seed, 10_000 + j) % 2**31


def equal_epochs_config(config: RunConfig, budget: int) -> RunConfig:
    """The baseline recipe given the cascade's ``budget`` of epochs. Its stopping rules are off
    (early stopping; under the plateau schedule, the lr floor ``min_lr``): with them, a baseline
    that stopped early would stop at the same epoch again, and the arm would only repeat the
    baseline instead of asking whether the cascade's extra epochs, spent on the baseline, do as well."""
    return config.updated({"train": LrSchedule.to_the_last_epoch(config.train, budget)})


def _arm_configs(config: RunConfig, forgetting: bool) -> tuple[RunConfig, RunConfig | None]:
    """The configuration of the cascade and baseline runs, and that of the forgetting run (None
    without that arm): ``procedure.split``/``rounds`` are the forgetting arm's alone."""
    procedure = config.as_dict()["procedure"]
    if not forgetting and (given := [f"procedure.{k}" for k, v in procedure.items() if v is not None]):
        raise ConfigError(f"compare reads {', '.join(given)} only for its forgetting arm (--forgetting)")
    return config.updated({"procedure": dict.fromkeys(procedure)}), config if forgetting else None


def seed_runs(
    seed: int,
    config: RunConfig,
    forget_config: RunConfig | None,
    k: int,
    cascade: dict[str, Any] | None = None,
) -> dict[str, tuple[str, int, RunConfig]]:
    """The runs seed ``seed`` of a comparison needs, name -> (procedure, seed, config): its cascade;
    once ``cascade`` (that run's summary) has finished, the baseline given its epochs; best-of-k's
    k-1 fresh baselines; with ``forget_config``, the forgetting run. The one definition of each run,
    for ``run_all`` and ``run_only`` alike."""
    runs = {cascade_run(seed): ("cascade", seed, config)}
    if cascade is not None:
        budget = sum(st["epochs"] for st in cascade["stages"])
        runs[equal_run(seed)] = ("baseline", seed, equal_epochs_config(config, budget))
    runs.update({extra_run(seed, j): ("baseline", extra_seed(seed, j), config) for j in range(1, k)})
    if forget_config is not None:
        runs[forget_run(seed)] = ("forget", seed, forget_config)
    return runs


def run_all(
    task: Task,
    out: Path,
    seeds: int,
    config: RunConfig,
    preset: str | None,
    device,
    jobs: int,
    task_factory: Callable[[], Task] | None,
    forgetting: bool = False,
) -> list[dict[str, Any]]:
    """Per seed, the summaries of its runs: ``cascade``, ``equal`` (the equal-epochs baseline),
    ``extras`` (best-of-k's fresh baselines) and, with ``forgetting``, ``forget``.

    Every cascade is queued first, then the extra baselines its plan implies (they need nothing
    from it), then the forget runs, then, as each cascade finishes, the baseline given its epochs
    (and any extra baseline the plan could not foresee), so ``jobs`` workers stay busy even with
    fewer seeds than jobs. Every run depends only on its own seed and configuration, so the order
    changes nothing."""
    config, forget_config = _arm_configs(config, forgetting)
    planned = planned_models(task, config) or 1
    runs = {s: seed_runs(s, config, forget_config, planned) for s in range(seeds)}
    futures: dict[str, Future] = {}

    def queue(s: int, names) -> None:
        for name in names:
            if name not in futures:
                procedure, seed, cfg = runs[s][name]
                futures[name] = workers.submit(_run, out, procedure, name, seed, cfg, preset, device)

    with Workers(task, jobs, task_factory) as workers:
        for s in range(seeds):
            queue(s, [cascade_run(s)])
        for s in range(seeds):  # the extra baselines (the forget runs after them)
            queue(s, [name for name in runs[s] if name != forget_run(s)])
        for s in range(seeds):
            queue(s, runs[s])
        cascades = {futures[cascade_run(s)]: s for s in range(seeds)}
        trained, k = {}, {}
        for done in as_completed(cascades):
            s = cascades[done]
            trained[s] = cascade = done.result()
            k[s] = models_trained(cascade)
            runs[s] = seed_runs(s, config, forget_config, k[s], cascade)
            queue(s, runs[s])
        return [
            {
                "cascade": trained[s],
                "equal": futures[equal_run(s)].result(),
                "extras": [futures[extra_run(s, j)].result() for j in range(1, k[s])],
                **({"forget": futures[forget_run(s)].result()} if forgetting else {}),
            }
            for s in range(seeds)
        ]


def run_only(
    task: Task,
    out: str | Path,
    names: list[str],
    *,
    seeds: int,
    config: RunConfig,
    preset: str | None = None,
    device=None,
    jobs: int = 1,
    task_factory: Callable[[], Task] | None = None,
    forgetting: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train (or resume, or read back) only the runs ``names`` of the comparison ``run_compare`` would
    make with these arguments, each as it would (name, seed, recipe, budget), and write no
    ``compare.*``: a machine that lives shorter than the whole comparison, or a second process,
    takes on a part of it, and ``run_compare`` reuses what they finished. An equal-epochs baseline
    needs its seed's finished cascade (its epochs are the budget). Returns each run's summary."""
    out = Path(out)
    config, forget_config = _arm_configs(config, forgetting)
    planned = planned_models(task, config) or 1
    runs: dict[str, tuple[str, int, RunConfig]] = {}
    for s in range(seeds):
        cascade = finished_summary(out / "runs", cascade_run(s))
        k = models_trained(cascade) if cascade else planned
        runs |= seed_runs(s, config, forget_config, k, cascade)
    waiting = {equal_run(s): cascade_run(s) for s in range(seeds) if equal_run(s) not in runs}
    for name in names:
        if name in waiting:
            raise ConfigError(
                f"{name} needs {waiting[name]} finished first in {out / 'runs'} (its epochs are the budget)"
            )
        if name not in runs:
            valid = ", ".join([*runs, *waiting])
            raise ConfigError(f"--only {name}: not a run of this comparison ({valid})")
    with Workers(task, jobs, task_factory) as workers:
        futures = {}
        for name in dict.fromkeys(names):
            procedure, seed, cfg = runs[name]
            futures[name] = workers.submit(_run, out, procedure, name, seed, cfg, preset, device)
        return {name: future.result() for name, future in futures.items()}


def finished_summary(runs: Path, name: str) -> dict[str, Any] | None:
    """The summary of ``runs/name`` if that run has finished, else None."""
    summary = RunDir(runs / name).read_summary() if (runs / name).is_dir() else None
    return summary if summary and summary.get("status") == "complete" else None
