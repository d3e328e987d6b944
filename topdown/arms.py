"""The runs behind a fair comparison's arms (``topdown.compare``): what each run is (its name under
``DIR/runs/``, procedure, seed and recipe) and their scheduling over workers.

``seed_runs`` is the one definition of a seed's runs, for the whole comparison (``run_all``) and for a
part of it trained alone (``run_only``: a machine that lives shorter than the whole comparison, or a
second process). Finished runs are read back and unfinished ones resumed; only their summaries are
read (``finished_summary``), so a finished run whose checkpoints were deleted still counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from topdown.config import RunConfig
from topdown.errors import ConfigError
from topdown.executors import Executor, chosen
from topdown.identity import current_name, former_names
from topdown.procedures import PLANS, plan_class, planned_models, run_or_resume
from topdown.runs import RunDir
from topdown.schedule import LrSchedule
from topdown.seeds import derive_seed
from topdown.task import Task
from topdown.tracking import Tracking

# the controls of every comparison, beside its arms (plans: ``--arms``)
CONTROLS = ("baseline", "baseline-equal-epochs", "best-of-k")
DEFAULT_ARMS = ("cascade",)
CONTROL_RUNS = ("baseline", "equal-epochs")  # run names ``NAME-seedN`` that are no arm's

Summaries = Callable[[str], dict[str, Any] | None]  # a run's name -> its summary, None if not finished


class RunOrder(NamedTuple):
    """What one run of a comparison is: its procedure, seed and recipe, and the run whose finished
    stage 0 it takes instead of training it (``adopt``; an arm's: its seed's baseline run)."""

    procedure: str
    seed: int
    config: RunConfig
    baseline_from: str | None = None


def run_one(
    task: Task,
    out: Path,
    name: str,
    order: RunOrder,
    preset: str | None,
    device,
    track: Tracking | None = None,
) -> dict[str, Any]:
    """One run of the comparison, ``out/runs/name``, as ``order`` says (a worker's unit of work);
    only its summary is read."""
    runs = out / "runs"
    return run_or_resume(
        order.procedure,
        task,
        runs / name,
        config=order.config,
        seed=order.seed,
        preset=preset,
        device=device,
        weights_needed=False,
        track=track,
        baseline_from=None if order.baseline_from is None else runs / order.baseline_from,
    )


def models_trained(summary: dict[str, Any]) -> int:
    """How many models a finished run trained (every candidate of every stage, its baseline
    included): a cascade's is the k of its best-of-k control."""
    return sum(max(1, len(st["candidates"])) for st in summary["stages"])


def total_epochs(summary: dict[str, Any]) -> int:
    """The epochs a finished run trained, all its stages together: its budget."""
    return sum(st["epochs"] for st in summary["stages"])


def cascade_run(seed: int | str) -> str:
    """The name of seed ``seed``'s cascade under ``runs/``."""
    return f"cascade-seed{seed}"


def equal_run(seed: int) -> str:
    """The name of seed ``seed``'s equal-epochs baseline under ``runs/``."""
    return f"equal-epochs-seed{seed}"


def extra_run(seed: int, j: int) -> str:
    """The name of best-of-k's j-th fresh baseline (j >= 1) for seed ``seed`` under ``runs/``."""
    return f"baseline-seed{seed}-extra{j}"


def extra_seed(seed: int, j: int) -> int:
    """The seed of best-of-k's j-th fresh baseline for comparison seed ``seed``."""
    return derive_seed(seed, 10_000 + j) % 2**31


def equal_epochs_config(config: RunConfig, budget: int) -> RunConfig:
    """The baseline recipe given a ``budget`` of epochs. Its stopping rules are off
    (early stopping; under the plateau schedule, the lr floor ``min_lr``): with them, a baseline
    that stopped early would stop at the same epoch again, and the arm would only repeat the
    baseline instead of asking whether the arms' extra epochs, spent on the baseline, do as well."""
    return config.updated({"train": LrSchedule.to_the_last_epoch(config.train, budget)})


def resolve_arms(plans: Sequence[str] | str) -> tuple[str, ...]:
    """The arms ``plans`` names (a plan's name each, as ``topdown run`` takes it), under their
    current names, each checked to name a plan (``plan_class``) before anything trains; refused:
    none, one twice, the baseline (a control of every comparison). A string is a comma-separated list."""
    arms = tuple(current_name(p.strip()) for p in (plans.split(",") if isinstance(plans, str) else plans))
    if not arms:
        raise ConfigError("a comparison needs an arm (--arms PLAN[,PLAN...])")
    for arm in arms:
        if arm in CONTROLS:
            raise ConfigError(f"--arms {arm}: the {arm} is a control of every comparison, not an arm to add")
        plan_class(arm)
    if twice := sorted({a for a in arms if arms.count(a) > 1}):
        raise ConfigError(f"--arms names {', '.join(twice)} twice")
    return arms


class ComparisonRuns:
    """The runs under ``runs`` of a comparison of ``arms`` (current names), per seed: one run of
    each arm (``ARM-seedN``); the baseline arm's run (the cascade's, whose stage 0 it is, when the
    cascade is an arm, else ``baseline-seedN``); best-of-k's fresh baselines; and the
    equal-epochs baseline, given the largest total epochs among ``budget_arms`` (default: every
    arm), so that no arm had more training than the baseline given its epochs."""

    def __init__(self, runs: Path, arms: Sequence[str], budget_arms: Sequence[str] | None = None):
        self.runs, self.arms = runs, tuple(arms)
        self.budget_arms = self.arms if budget_arms is None else tuple(current_name(a) for a in budget_arms)
        if unknown := [a for a in self.budget_arms if a not in self.arms]:
            raise ConfigError(f"budget_arms {', '.join(unknown)}: not an arm of this comparison")
        self.has_cascade = "cascade" in self.arms

    @property
    def columns(self) -> tuple[str, ...]:
        """The arms and controls of the comparison's record, in its order."""
        others = tuple(a for a in self.arms if a != "cascade")
        return ("baseline", *(("cascade",) if self.has_cascade else ()), *CONTROLS[1:], *others)

    @property
    def controls(self) -> tuple[str, ...]:
        """What every other arm must beat: the comparison's controls, then the arms whose plans are
        controls (``Plan.control``, as ``restarts``)."""
        return (*CONTROLS, *(a for a in self.arms if plan_class(a).control))

    def arm_run(self, arm: str, seed: int) -> str:
        """The name of seed ``seed``'s run of ``arm``: ``ARM-seedN``, or the name a comparison gave
        it under the plan's former name (``identity.FORMER_NAMES``), where a run of that name is."""
        for old in former_names(arm):
            if (self.runs / f"{old}-seed{seed}").is_dir():
                return f"{old}-seed{seed}"
        return f"{arm}-seed{seed}"

    def baseline_run(self, seed: int) -> str:
        """The run whose stage 0 is seed ``seed``'s baseline arm: the cascade's when it is an arm (a
        baseline run with that seed would be bit-identical), else a baseline run of its own."""
        return cascade_run(seed) if self.has_cascade else f"baseline-seed{seed}"

    def budget(self, seed: int, summary: Summaries) -> int | None:
        """The equal-epochs baseline's epochs: the largest total among the budget arms' runs; None
        until they have all finished."""
        runs = [summary(self.arm_run(a, seed)) for a in self.budget_arms]
        return None if None in runs else max(total_epochs(r) for r in runs)

    def k(self, seed: int, summary: Summaries) -> int | None:
        """Best-of-k's k: as many models as the cascade trained, or, without a cascade arm, as the
        arm that trained the most; None until those runs have finished."""
        runs = [summary(self.arm_run(a, seed)) for a in (("cascade",) if self.has_cascade else self.arms)]
        return None if None in runs else max(models_trained(r) for r in runs)


def arm_configs(config: RunConfig, arms: Sequence[str]) -> tuple[RunConfig, dict[str, RunConfig]]:
    """The configuration of the baselines, and of each arm's runs: an arm gets the ``procedure.*``
    options its plan reads (every one, for a plan that does not declare them), the others none; an
    option no arm reads is refused rather than ignored."""
    procedure = config.as_dict()["procedure"]
    options = {arm: plan_class(arm).procedure_options for arm in arms}

    def reads(arm: str, key: str) -> bool:
        return options[arm] is None or key in options[arm]

    given = [k for k, v in procedure.items() if v is not None]
    if unread := [k for k in given if not any(reads(a, k) for a in arms)]:
        users = [name for name, plan in PLANS.items() if set(unread) & set(plan.procedure_options or ())]
        raise ConfigError(
            f"compare reads {', '.join(f'procedure.{k}' for k in unread)} only for an arm whose plan uses "
            f"it ({', '.join(users)}; --arms), and its arms ({', '.join(arms)}) do not"
        )
    return config.updated({"procedure": dict.fromkeys(procedure)}), {
        arm: config.updated({"procedure": {k: v if reads(arm, k) else None for k, v in procedure.items()}})
        for arm in arms
    }


def seed_runs(
    comparison: ComparisonRuns,
    seed: int,
    configs: tuple[RunConfig, dict[str, RunConfig]],
    planned_k: int,
    summary: Summaries,
) -> dict[str, RunOrder]:
    """The runs seed ``seed`` of a comparison needs, by name: its first arm's run; the baseline
    arm's own run, where it has one; once the arms' runs have finished (``summary``), the baseline
    given their budget; best-of-k's k-1 fresh baselines (``planned_k`` until the runs that decide k
    have finished); the other arms' runs, each starting from the baseline run's stage 0 where that
    has finished. The one definition of each run, for ``run_all`` and ``run_only`` alike."""
    base, arm_config = configs
    baseline = comparison.baseline_run(seed)
    arms = {
        (name := comparison.arm_run(a, seed)): RunOrder(
            a, seed, arm_config[a], None if name == baseline else baseline
        )
        for a in comparison.arms
    }
    first = next(iter(arms))
    runs = {first: arms.pop(first)}
    if not comparison.has_cascade:
        runs[baseline] = RunOrder("baseline", seed, base)
    if (budget := comparison.budget(seed, summary)) is not None:
        runs[equal_run(seed)] = RunOrder("baseline", seed, equal_epochs_config(base, budget))
    k = comparison.k(seed, summary) or planned_k
    runs.update({extra_run(seed, j): RunOrder("baseline", extra_seed(seed, j), base) for j in range(1, k)})
    runs.update(arms)
    return runs


def _planned_k(task: Task, comparison: ComparisonRuns, base: RunConfig) -> int:
    """Best-of-k's k as far as it is known before any run: a cascade's plan says how many models it
    trains (unless its patience may end it early); any other arm's, once it has run."""
    return (planned_models(task, base) if comparison.has_cascade else None) or 1


def run_all(
    task: Task,
    comparison: ComparisonRuns,
    seeds: int,
    config: RunConfig,
    preset: str | None,
    device,
    executor: Executor,
    task_factory: Callable[[], Task] | None,
    track: Tracking | None = None,
) -> list[dict[str, dict[str, Any]]]:
    """Per seed, the summaries of its runs, by name (``seed_runs``), trained by the ``executor``'s
    workers (``run_scheduled``). ``track``: trackers of every run (``Tracking.of_runs_in``)."""
    out = comparison.runs.parent
    with executor.open(task, task_factory) as workers:

        def submit(name: str, order: RunOrder) -> Future:
            return workers.submit(run_one, out, name, order, preset, device, track)

        return run_scheduled([Scheduled.of(task, comparison, seeds, config, submit)])[0]


# how a comparison's run is handed to a worker: (name, order) -> its summary, to come
Submit = Callable[[str, RunOrder], Future]


@dataclass(frozen=True)
class Scheduled:
    """One comparison among those ``run_scheduled`` trains together: its runs and seeds, the
    baselines' and each arm's recipe (``arm_configs``), best-of-k's k as far as it is known before
    any run, and how one of its runs is handed to a worker. ``of`` makes one."""

    comparison: ComparisonRuns
    seeds: int
    configs: tuple[RunConfig, dict[str, RunConfig]]
    planned_k: int
    submit: Submit

    @classmethod
    def of(
        cls, task: Task, comparison: ComparisonRuns, seeds: int, config: RunConfig, submit: Submit
    ) -> Scheduled:
        """The comparison of ``task`` (only its model is read, and it is not kept) under ``config``."""
        configs = arm_configs(config, comparison.arms)
        return cls(comparison, seeds, configs, _planned_k(task, comparison, configs[0]), submit)


def run_scheduled(
    scheduled: Sequence[Scheduled],
    finished: Callable[[int, list[dict[str, dict[str, Any]]]], None] | None = None,
) -> list[list[dict[str, dict[str, Any]]]]:
    """Per comparison, per seed, the summaries of its runs, by name (``seed_runs``), all the
    comparisons' runs handed to the same workers; ``finished(i, runs)`` is called as soon as
    comparison ``i``'s runs have all finished (a sweep writes that cell's results then).

    Every seed's first arm run (of every comparison) is queued first, then the baselines known
    before any run (the baseline arm's own, best-of-k's that a cascade's plan implies), then the
    other arms' runs, then, as the arms' runs finish, the baseline given their budget (and any extra
    baseline not foreseen), so the workers stay busy even with fewer seeds than workers, and no
    comparison waits for another's last runs. Every run depends only on its own seed and
    configuration, so the order changes nothing."""
    summaries: list[dict[str, dict[str, Any]]] = [{} for _ in scheduled]

    def runs_of(i: int, s: int) -> dict[str, RunOrder]:
        c = scheduled[i]
        return seed_runs(c.comparison, s, c.configs, c.planned_k, summaries[i].get)

    units = [(i, s) for i, c in enumerate(scheduled) for s in range(c.seeds)]  # (comparison, seed)
    runs = {unit: runs_of(*unit) for unit in units}
    futures: dict[tuple[int, str], Future] = {}

    def queue(unit: tuple[int, int], names) -> None:
        i = unit[0]
        for name in names:
            if (i, name) not in futures:
                futures[i, name] = scheduled[i].submit(name, runs[unit][name])

    def results(i: int) -> list[dict[str, dict[str, Any]]]:
        return [{name: futures[i, name].result() for name in runs[i, s]} for s in range(scheduled[i].seeds)]

    arm_runs = {
        (i, s): [scheduled[i].comparison.arm_run(a, s) for a in scheduled[i].comparison.arms]
        for i, s in units
    }
    for unit in units:
        queue(unit, arm_runs[unit][:1])
    for unit in units:
        queue(unit, [name for name in runs[unit] if name not in arm_runs[unit]])
    for unit in units:
        queue(unit, runs[unit])
    arm_of = {futures[unit[0], name]: (unit, name) for unit in units for name in arm_runs[unit]}
    waiting, told = set(futures.values()), set()
    while waiting:
        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        for future in done & arm_of.keys():  # an arm's run: its budget may queue more baselines
            unit, name = arm_of[future]
            summaries[unit[0]][name] = future.result()
            runs[unit] = runs_of(*unit)
            queue(unit, runs[unit])
        waiting |= {f for f in futures.values() if not f.done()}
        for i in range(len(scheduled)):  # every run a comparison needs is queued by now
            seeds = range(scheduled[i].seeds)
            if finished and i not in told and all(futures[i, n].done() for s in seeds for n in runs[i, s]):
                told.add(i)
                finished(i, results(i))
    return [results(i) for i in range(len(scheduled))]


def run_only(
    task: Task,
    out: str | Path,
    names: list[str],
    *,
    seeds: int,
    config: RunConfig,
    arms: Sequence[str] = DEFAULT_ARMS,
    budget_arms: Sequence[str] | None = None,
    preset: str | None = None,
    device=None,
    jobs: int = 1,
    task_factory: Callable[[], Task] | None = None,
    executor: Executor | None = None,
    track: Tracking | str | Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train (or resume, or read back) only the runs ``names`` of the comparison ``run_compare`` would
    make with these arguments, each as it would (name, seed, recipe, budget), and write no
    ``compare.*``: a machine that lives shorter than the whole comparison, or a second process,
    takes on a part of it, and ``run_compare`` reuses what they finished. An equal-epochs baseline
    needs its seed's arms finished (their epochs are the budget). Returns each run's summary."""
    executor = chosen(executor, jobs, task_factory)
    out = Path(out)
    track = Tracking.of(track).of_runs_in(out)
    comparison = ComparisonRuns(out / "runs", resolve_arms(arms), budget_arms)
    configs = arm_configs(config, comparison.arms)
    planned = _planned_k(task, comparison, configs[0])
    runs: dict[str, RunOrder] = {}
    waiting = {}
    for s in range(seeds):
        runs |= seed_runs(comparison, s, configs, planned, functools.partial(finished_summary, out / "runs"))
        if equal_run(s) not in runs:
            unfinished = [comparison.arm_run(a, s) for a in comparison.budget_arms]
            waiting[equal_run(s)] = [n for n in unfinished if finished_summary(out / "runs", n) is None]
    for name in names:
        if name in waiting:
            raise ConfigError(
                f"{name} needs {', '.join(waiting[name])} finished first in {out / 'runs'} (their epochs "
                "are the budget)"
            )
        if name not in runs:
            valid = ", ".join([*runs, *waiting])
            raise ConfigError(f"--only {name}: not a run of this comparison ({valid})")
    with executor.open(task, task_factory, calls=len(set(names))) as workers:
        futures = {}
        for name in dict.fromkeys(names):
            futures[name] = workers.submit(run_one, out, name, runs[name], preset, device, track)
        return {name: future.result() for name, future in futures.items()}


def finished_summary(runs: Path, name: str) -> dict[str, Any] | None:
    """The summary of ``runs/name`` if that run has finished, else None."""
    summary = RunDir(runs / name).read_summary() if (runs / name).is_dir() else None
    return summary if summary and summary.get("status") == "complete" else None
