"""Fair comparison of plans (its arms: the cascade by default) against baselines, over seeds
(docs/usage.md, "Fair comparisons").

Per seed s, each arm and three controls, each measured on the test set of the model validation
chose:

- each arm (``arms``: ``cascade``, ``forgetting``, any plan's name as ``topdown run`` takes it):
  its run with seed s;
- ``baseline``: stage 0 of the cascade run with seed s when the cascade is an arm (a baseline run
  with seed s would be bit-identical, so it is reused, not trained twice), else a baseline run;
- ``baseline-equal-epochs``: one baseline run with seed s given the largest total number of epochs
  among the arms' runs of seed s (``arms.equal_epochs_config``: the same recipe, its early stopping
  off, so that it trains them all; the epoch validation finds best is kept, as in every run);
- ``best-of-k``: k = the number of models the cascade trained (without a cascade arm: the most
  models any arm trained); the seed-s baseline plus k-1 baselines with fresh seeds, the one with
  the best validation metric.

Every run is an ordinary run directory under ``DIR/runs/``; finished runs are read back and
unfinished ones resumed, so an interrupted comparison continues where it stopped. Only their
summaries are read, so a finished run whose checkpoints were deleted still counts: a comparison
longer than a machine's life continues elsewhere from its finished runs' records (``topdown compare
--runs-from``, ``topdown.archive``), and is rebuilt from them without training.

Here: the comparison (``run_compare``; with a margin, sequential: seeds added until each
difference's anytime-valid interval lies beyond it, ``stopping_rule``) and each arm's result read
back from its runs' summaries. Its report (compare.md, compare.png) is ``topdown.compare_report``;
the runs themselves (their names, recipes and scheduling, and ``run_only``, which trains some of
them alone for a machine or process that takes on part of it), ``topdown.arms``; the paired
statistics, ``topdown.stats``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from topdown.arms import (
    CONTROL_RUNS,
    DEFAULT_ARMS,
    ComparisonRuns,
    Summaries,
    equal_run,
    extra_run,
    finished_summary,
    resolve_arms,
    run_all,
)
from topdown.compare_report import plot, render
from topdown.config import RunConfig
from topdown.errors import ConfigError, TopdownError
from topdown.executors import Executor, chosen
from topdown.identity import current_name
from topdown.metrics import Metric, display_scale
from topdown.report import format_metric, stage_result, table_head, write_record
from topdown.stats import excludes, paired_stats, summarise
from topdown.task import Task
from topdown.tracking import Tracking


def _entry(chosen: dict[str, Any], trained: list[dict[str, Any]], metric: str, run: str) -> dict[str, Any]:
    """One arm's result for one seed: the chosen model's metrics (from ``run``) and the cost of the
    stages it trained."""
    return {
        **stage_result(chosen, metric, run),
        "epochs": sum(st["epochs"] for st in trained),
        "seconds": sum(st["seconds"] for st in trained),
    }


def seed_arms(
    primary: Metric, seed: int, comparison: ComparisonRuns, summary: Summaries
) -> dict[str, dict[str, Any]]:
    """Every arm's result for one seed, from the summaries of its runs (``summary``: a run's name ->
    its summary, None if it has not finished). An arm whose runs have not all finished (a
    comparison still in progress) is left out."""
    metric = primary.name
    arms = {}
    if (base := summary(comparison.baseline_run(seed))) is not None:
        stage0 = base["stages"][0]
        # the baseline arm is the cascade's stage 0, or a baseline run of its own
        baseline = (
            f"{comparison.baseline_run(seed)}#stage0"
            if comparison.has_cascade
            else comparison.baseline_run(seed)
        )
        arms["baseline"] = {**_entry(stage0, [stage0], metric, baseline), "runs": [baseline]}
    for arm in comparison.arms:
        if (run := summary(name := comparison.arm_run(arm, seed))) is not None:
            arms[arm] = {
                **_entry(run["stages"][run["chosen_stage"]], run["stages"], metric, name),
                "runs": [name],
            }
    if (equal := summary(equal_run(seed))) is not None:
        arms["baseline-equal-epochs"] = {
            **_entry(equal["stages"][0], equal["stages"], metric, equal_run(seed)),
            "runs": [equal_run(seed)],
        }
    k = comparison.k(seed, summary)
    extras = [summary(extra_run(seed, j)) for j in range(1, k or 0)]
    if base is not None and k is not None and None not in extras:
        pool = [(stage0, baseline)] + [(x["stages"][0], extra_run(seed, j)) for j, x in enumerate(extras, 1)]
        best = pool[0]
        for candidate in pool[1:]:  # chosen on validation only
            if primary.better(candidate[0]["val"][metric], best[0]["val"][metric]):
                best = candidate
        arms["best-of-k"] = {
            **_entry(best[0], [p[0] for p in pool], metric, best[1]),
            "k": len(pool),
            "chosen_run": best[1],
            "runs": [p[1] for p in pool],
        }
    return {arm: arms[arm] for arm in comparison.columns if arm in arms}


def comparison_in(runs: Path) -> ComparisonRuns | None:
    """The comparison whose runs are in ``runs`` (its arms read from their run names, ``ARM-seedN``,
    cascade first), or None where no arm has a run there."""
    names = [m[1] for p in runs.glob("*-seed*") if (m := re.fullmatch(r"(.+)-seed\d+", p.name))]
    arms = sorted(
        {current_name(n) for n in names if n not in CONTROL_RUNS}, key=lambda a: (a != "cascade", a)
    )
    return ComparisonRuns(runs, arms) if arms else None


def finished_seeds(runs: Path) -> str | None:
    """For a comparison in progress (``runs``: its ``runs/``), per seed whose baseline arm has
    finished, the test metric of every arm whose runs have all finished ("-" for the others), with
    the values compare.md's per-seed table will show (a rate with its % sign); None when no seed's
    baseline has finished. A seed one of whose runs has no test value to show gets that run's error
    instead of its row. The means, intervals and p-values wait for the comparison itself."""
    if (comparison := comparison_in(runs)) is None:
        return None
    summary = functools.partial(finished_summary, runs)
    seeds = {int(m[1]) for p in runs.glob("*-seed*") if (m := re.fullmatch(r".+-seed(\d+)", p.name))}
    rows, metric = [], None
    for s in sorted(seeds):
        if (base := summary(comparison.baseline_run(s))) is None:
            continue
        metric = Metric.named(base["metric"], base["lower_is_better"])
        try:
            rows.append((s, seed_arms(metric, s, comparison, summary)))
        except TopdownError as e:  # a null test value: said in place of the seed's row
            rows.append((s, str(e)))
    if not rows:
        return None
    m, names = metric.name, comparison.columns
    lines = [
        f"Seeds whose baseline has finished: test {m} of each arm whose runs have all finished (the "
        "comparison itself",
        "adds the means, intervals and p-values once every seed has).",
        "",
        *table_head(["seed", *names]),
    ]
    lines += [
        f"| {s} | {arms} |"
        if isinstance(arms, str)
        else f"| {s} | "
        + " | ".join(format_metric(arms[a]["test"], m) if a in arms else "-" for a in names)
        + " |"
        for s, arms in rows
    ]
    return "\n".join(lines)


def run_compare(
    task: Task,
    out: str | Path,
    *,
    seeds: int,
    config: RunConfig,
    arms: Sequence[str] = DEFAULT_ARMS,
    budget_arms: Sequence[str] | None = None,
    preset: str | None = None,
    device=None,
    jobs: int = 1,
    task_factory: Callable[[], Task] | None = None,
    effect: float | None = None,
    until_margin: float | None = None,
    max_seeds: int | None = None,
    until_controls: Sequence[str] | None = None,
    executor: Executor | None = None,
    track: Tracking | str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every arm and control for seeds 0..seeds-1; write ``compare.json``,
    ``compare.md``, ``compare.png``. ``arms``: plans' names (``procedures.plan_class``: a built-in
    plan or ``module:Class``); ``budget_arms``: the arms whose largest total epochs the
    equal-epochs baseline is given (default: all of them). ``jobs`` > 1 runs the runs in that many
    processes, each building its task with ``task_factory``; ``executor`` (``topdown.executors``:
    ``Local``, ``Ray``, ``Slurm``) runs them elsewhere instead. ``track``: trackers every run also
    logs to (``Tracking.of_runs_in``: one MLflow experiment and store for the comparison).

    ``effect``: per paired difference, the seeds one of that size would need (``seeds_needed``).
    ``until_margin``: then add seeds, ``jobs`` at a time (at least one), until every one of the
    ``until_controls`` (default: all; ``stopping_rule``) has an anytime-valid interval that
    excludes the margin, or ``max_seeds`` seeds have run (``stopping`` in the record).
    ``effect`` and ``until_margin`` are in the metric's display units (``display_scale``: points of
    a rate); compare.json holds them, like every number, in the metric's own."""
    check_seeds(seeds)
    check_effect(effect)
    out = Path(out)
    comparison = ComparisonRuns(out / "runs", resolve_arms(arms), budget_arms)
    scale, _ = display_scale(task.primary.name)
    effect = None if effect is None else effect / scale
    rule = stopping_rule(comparison, seeds, until_margin, max_seeds, until_controls, scale, jobs)
    executor = chosen(executor, jobs, task_factory)
    track = Tracking.of(track).of_runs_in(out)
    n, looks = seeds, []
    while True:
        runs = run_all(task, comparison, n, config, preset, device, executor, task_factory, track)
        record = comparison_record(task, comparison, config, preset, runs, effect, anytime=rule is not None)
        looks.append(n)
        if rule is None:
            break
        difference = rule["difference"]
        undecided = [
            c for c in rule["controls"] if not excludes(record["arms"][c][difference]["cs95"], rule["margin"])
        ]
        if not undecided or n >= rule["max_seeds"]:
            break
        n = min(rule["max_seeds"], n + rule["batch"])
    if rule is not None:
        record["stopping"] = {
            **rule,
            "looks": looks,
            "stopped": "margin excluded" if not undecided else "seed budget spent",
            "undecided": undecided,
            # as valid as the stop itself: a difference, if any, smaller than the margin
            "within_margin": [
                c
                for c in undecided
                if (cs := record["arms"][c][difference]["cs95"]) and max(map(abs, cs)) < rule["margin"]
            ],
        }
    write_record(out, "compare", record, render, plot)
    return record


def check_seeds(seeds: int) -> None:
    """Refuse a number of seeds no comparison can be made of."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")


def check_effect(effect: float | None) -> None:
    """Refuse an effect no number of seeds could be needed for."""
    if effect is not None and not effect > 0:
        raise ConfigError(f"--effect must be positive, got {effect}")


def comparison_record(
    task: Task,
    comparison: ComparisonRuns,
    config: RunConfig,
    preset: str | None,
    runs: list[dict[str, dict[str, Any]]],
    effect: float | None = None,
    anytime: bool = False,
) -> dict[str, Any]:
    """``compare.json``'s record of ``comparison`` from its runs' summaries (``runs``: per seed, by
    name, as ``arms.run_all`` returns them): every arm's results per seed and the paired statistics
    (``effect`` in the metric's own units; ``anytime``: with the anytime-valid intervals)."""
    primary = task.primary
    return {
        "task": task.name,
        "preset": preset,
        "seeds": len(runs),
        "metric": primary.name,
        "lower_is_better": primary.lower_is_better,
        "config": config.as_dict(),
        "arms": _arms_record(primary, comparison, runs, effect, anytime),
        "budget_arms": list(comparison.budget_arms),
        "note": task.info.get("note"),
        **({"effect": effect} if effect is not None else {}),
    }


def stopping_rule(
    comparison: ComparisonRuns,
    seeds: int,
    margin: float | None,
    max_seeds: int | None,
    controls: Sequence[str] | None,
    scale: float,
    jobs: int,
) -> dict[str, Any] | None:
    """The sequential comparison's rule as compare.json records it (``margin`` in the metric's
    display units, divided by ``scale``), checked before anything trains; None without a margin.
    The differences it may wait for: with a cascade arm, the cascade against each control and other
    arm (``cascade_minus_arm``); without, each arm against the baseline (``vs_baseline``)."""
    if margin is None:
        if max_seeds is not None or controls:
            raise ConfigError("--max-seeds and --until-controls go with --until-margin")
        return None
    if not margin >= 0:
        raise ConfigError(f"--until-margin must be 0 or more, got {margin}")
    if max_seeds is None or max_seeds < seeds:
        raise ConfigError(
            f"--until-margin needs --max-seeds, the seed budget, at least --seeds ({seeds}); got {max_seeds}"
        )
    if comparison.has_cascade:
        difference, names = "cascade_minus_arm", [a for a in comparison.columns if a != "cascade"]
    else:
        difference, names = "vs_baseline", list(comparison.arms)
    if unknown := [c for c in controls or () if c not in names]:
        raise ConfigError(
            f"--until-controls {', '.join(unknown)}: not a difference this comparison reports "
            f"({', '.join(names)})"
        )
    return {
        "rule": "add seeds until the anytime-valid 95 % interval (topdown.stats.anytime_interval) of every "
        "named difference lies beyond the margin, or the budget is spent",
        "margin": margin / scale,
        "difference": difference,
        "controls": list(dict.fromkeys(controls)) if controls else names,
        "start": seeds,
        "max_seeds": max_seeds,
        "batch": max(1, jobs),
    }


def _arms_record(
    primary: Metric,
    comparison: ComparisonRuns,
    runs: list[dict[str, dict[str, Any]]],
    effect: float | None,
    anytime: bool,
) -> dict[str, dict[str, Any]]:
    """compare.json's ``arms``: each arm's and control's results over the seeds of ``runs`` (per
    seed, its runs' summaries by name) and its paired differences (``paired_stats``)."""
    seeds = len(runs)
    per_seed = [seed_arms(primary, seed, comparison, runs[seed].get) for seed in range(seeds)]
    names = comparison.columns
    results = {arm: [per_seed[seed][arm] for seed in range(seeds)] for arm in names}
    tests = {arm: [r["test"] for r in results[arm]] for arm in names}

    def paired(values: list[float], reference: list[float]) -> dict[str, Any]:
        return paired_stats(values, reference, effect=effect, anytime=anytime)

    controls = comparison.controls

    def against_controls(arm: str) -> dict[str, Any]:
        """An arm against every control (``vs_controls``: arm minus control) and whether its interval
        lies on the better side of zero against each one (``beats_every_control``)."""
        if arm in controls:
            return {}
        vs = {c: paired(tests[arm], tests[c]) for c in controls}
        return {"vs_controls": vs, "beats_every_control": all(_better(v, primary) for v in vs.values())}

    return {
        arm: {
            "test": summarise(tests[arm]),
            "epochs": summarise([r["epochs"] for r in results[arm]]),
            "seconds": summarise([r["seconds"] for r in results[arm]]),
            "vs_baseline": paired(tests[arm], tests["baseline"]) if arm != "baseline" else None,
            # the question a reviewer asks: does the cascade beat each control, seed by seed?
            "cascade_minus_arm": paired(tests["cascade"], tests[arm])
            if comparison.has_cascade and arm != "cascade"
            else None,
            **against_controls(arm),
            "per_seed": results[arm],
        }
        for arm in names
    }


def _better(difference: dict[str, Any], metric: Metric) -> bool:
    """Whether a paired difference's 95 % t-interval lies wholly on the better side of zero (one seed,
    no interval: not shown to be better)."""
    ci = difference["ci95"]
    return excludes(ci, 0.0) and (ci[1] < 0) == metric.lower_is_better
