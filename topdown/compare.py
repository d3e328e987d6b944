"""Fair comparison of the cascade against baselines, over seeds (docs/usage.md, "Fair comparisons").

Per seed s, four arms (five with the forgetting control), each measured on the test set of the
model validation chose:

- ``baseline``: stage 0 of the cascade run with seed s (a baseline run with seed s would be
  bit-identical, so it is reused, not trained twice);
- ``cascade``: the cascade run with seed s;
- ``baseline-equal-epochs``: one baseline run with seed s given the cascade's total number of
  epochs (``equal_epochs_config``: the same recipe, its early stopping off, so that it trains them
  all; the epoch validation finds best is kept, as in every run);
- ``best-of-k``: k = the number of models the cascade trained; the seed-s baseline plus
  k-1 baselines with fresh seeds, the one with the best validation metric;
- ``forgetting`` (optional): the ``forget`` run with seed s, a neighbour of the cascade with
  its budget (its stage 0 is the same baseline, trained again in that run).

Every run is an ordinary run directory under ``DIR/runs/``; finished runs are read back and
unfinished ones resumed, so an interrupted comparison continues where it stopped. Only their
summaries are read, so a finished run whose checkpoints were deleted still counts: a comparison
longer than a machine's life continues elsewhere from its finished runs' records (``topdown compare
--runs-from``, ``topdown.archive``), and is rebuilt from them without training. ``run_only`` trains
some of its runs alone, for a machine or process that takes on part of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from topdown.config import RunConfig
from topdown.errors import ConfigError, TopdownError
from topdown.jobs import Workers
from topdown.metrics import Metric, display_scale
from topdown.procedures import planned_models, run_or_resume
from topdown.report import format_metric, save_figure, stage_result, table_head, write_record
from topdown.runs import RunDir
from topdown.schedule import LrSchedule
from topdown.seeds import derive_seed
from topdown.task import Task

ARMS = ("baseline", "cascade", "baseline-equal-epochs", "best-of-k")
FORGETTING = "forgetting"  # the optional arm

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    """Student's t 97.5 % quantile (table up to 30 df, Cornish-Fisher expansion beyond)."""
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired sign-flip (permutation) test of mean difference 0.

    Exact for up to 20 pairs (all 2^n sign patterns), else estimated from 200,000 random
    patterns (fixed seed); it assumes only that, under the null
    hypothesis, each difference is as likely positive as negative, which suits small N.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return float("nan")
    if n <= 20:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(200_000, n))
    observed = abs(d.mean())
    return float(np.mean(np.abs((signs * d).mean(1)) >= observed - 1e-12))


def paired_stats(values: list[float], reference: list[float]) -> dict[str, Any]:
    """Mean, std and 95 % t-interval of ``values - reference`` (paired by seed), plus the sign-flip p."""
    diffs = [v - r for v, r in zip(values, reference)]
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:  # one seed has no spread: null, not NaN (which strict JSON readers refuse)
        sd, ci = None, None
    else:
        sd = float(np.std(diffs, ddof=1))
        half = t975(n - 1) * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {
        "n": n,
        "mean": mean,
        "std": sd,
        "ci95": ci,
        "p_sign_flip": sign_flip_p(diffs),
        "lower": sum(d < 0 for d in diffs),
        "higher": sum(d > 0 for d in diffs),
    }


def summarise(values: list[float]) -> dict[str, float | None]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def _entry(chosen: dict[str, Any], trained: list[dict[str, Any]], metric: str, run: str) -> dict[str, Any]:
    """One arm's result for one seed: the chosen model's metrics (from ``run``) and the cost of the
    stages it trained."""
    return {
        **stage_result(chosen, metric, run),
        "epochs": sum(st["epochs"] for st in trained),
        "seconds": sum(st["seconds"] for st in trained),
    }


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
        cascade = _complete(out / "runs", cascade_run(s))
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


def seed_arms(
    primary: Metric,
    seed: int,
    cascade: dict[str, Any],
    equal: dict[str, Any] | None,
    extras: list[dict[str, Any]] | None,
    forget: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every arm's result for one seed, from the summaries of its runs. An arm whose runs are not
    all given (None: a comparison still in progress) is left out."""
    metric = primary.name
    stage0 = cascade["stages"][0]
    chosen = cascade["stages"][cascade["chosen_stage"]]
    baseline = f"{cascade_run(seed)}#stage0"  # the baseline arm is the cascade's stage 0
    arms = {
        "baseline": {**_entry(stage0, [stage0], metric, baseline), "runs": [baseline]},
        "cascade": {
            **_entry(chosen, cascade["stages"], metric, cascade_run(seed)),
            "runs": [cascade_run(seed)],
        },
    }
    if equal is not None:
        arms["baseline-equal-epochs"] = {
            **_entry(equal["stages"][0], equal["stages"], metric, equal_run(seed)),
            "runs": [equal_run(seed)],
        }
    if extras is not None:
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
    if forget is not None:
        arms[FORGETTING] = {
            **_entry(forget["stages"][forget["chosen_stage"]], forget["stages"], metric, forget_run(seed)),
            "runs": [forget_run(seed)],
        }
    return arms


def _complete(runs: Path, name: str) -> dict[str, Any] | None:
    """The summary of ``runs/name`` if that run has finished, else None."""
    summary = RunDir(runs / name).read_summary() if (runs / name).is_dir() else None
    return summary if summary and summary.get("status") == "complete" else None


def finished_seeds(runs: Path) -> str | None:
    """For a comparison in progress (``runs``: its ``runs/``), per seed whose cascade has finished,
    the test metric of every arm whose runs have all finished ("-" for the others), with the values
    compare.md's per-seed table will show (a rate with its % sign); None when no cascade has
    finished. A seed one of whose runs has no test value to show gets that run's error instead of
    its row. The means, intervals and p-values wait for the comparison itself."""

    names = (*ARMS, FORGETTING) if any(runs.glob(forget_run("*"))) else ARMS
    rows, metric = [], None
    seeds = [p.name.removeprefix(cascade_run("")) for p in runs.glob(cascade_run("*"))]
    for s in sorted(int(n) for n in seeds if n.isdigit()):
        if (cascade := _complete(runs, cascade_run(s))) is None:
            continue
        k = models_trained(cascade)
        extras = [_complete(runs, extra_run(s, j)) for j in range(1, k)]
        metric = Metric.named(cascade["metric"], cascade["lower_is_better"])
        try:
            rows.append(
                (
                    s,
                    seed_arms(
                        metric,
                        s,
                        cascade,
                        _complete(runs, equal_run(s)),
                        None if None in extras else extras,
                        _complete(runs, forget_run(s)) if FORGETTING in names else None,
                    ),
                )
            )
        except TopdownError as e:  # a null test value: said in place of the seed's row
            rows.append((s, str(e)))
    if not rows:
        return None
    m = metric.name
    lines = [
        f"Seeds whose cascade has finished: test {m} of each arm whose runs have all finished (the "
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
    preset: str | None = None,
    device=None,
    jobs: int = 1,
    task_factory: Callable[[], Task] | None = None,
    forgetting: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every arm for seeds 0..seeds-1; write ``compare.json``, ``compare.md``,
    ``compare.png``.
    ``jobs`` > 1 runs the runs in that many processes, each building its task with ``task_factory``;
    ``forgetting`` adds the later-layer-forgetting arm."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    out = Path(out)
    primary = task.primary
    metric, lower = primary.name, primary.lower_is_better
    runs = run_all(task, out, seeds, config, preset, device, jobs, task_factory, forgetting)
    per_seed = [seed_arms(primary, seed, **runs[seed]) for seed in range(seeds)]
    names = (*ARMS, FORGETTING) if forgetting else ARMS
    results = {arm: {seed: per_seed[seed][arm] for seed in range(seeds)} for arm in names}

    tests = {arm: [results[arm][s]["test"] for s in range(seeds)] for arm in names}
    arms = {}
    for arm in names:
        arms[arm] = {
            "test": summarise(tests[arm]),
            "epochs": summarise([results[arm][s]["epochs"] for s in range(seeds)]),
            "seconds": summarise([results[arm][s]["seconds"] for s in range(seeds)]),
            "vs_baseline": paired_stats(tests[arm], tests["baseline"]) if arm != "baseline" else None,
            # the question a reviewer asks: does the cascade beat each control, seed by seed?
            "cascade_minus_arm": paired_stats(tests["cascade"], tests[arm]) if arm != "cascade" else None,
            "per_seed": [results[arm][s] for s in range(seeds)],
        }
    record = {
        "task": task.name,
        "preset": preset,
        "seeds": seeds,
        "metric": metric,
        "lower_is_better": lower,
        "config": config.as_dict(),
        "arms": arms,
        "note": task.info.get("note"),
    }
    write_record(out, "compare", record, render, plot)
    return record


def render(record: dict[str, Any]) -> str:
    m = record["metric"]
    _, unit = display_scale(m)

    def f(x: float) -> str:
        return format_metric(x, m, sign=False)

    lines = [
        f"# Fair comparison on {record['task']} (preset {record['preset']}, {record['seeds']} seeds)",
        "",
        f"Test {m}{unit} of the model each arm's validation chose; differences are arm minus baseline, "
        "paired by seed",
        f"({'lower' if record['lower_is_better'] else 'higher'} is better). CI: 95 % Student-t interval of "
        "the mean paired",
        "difference; p: two-sided sign-flip test (exact up to 20 seeds, else 200,000 random sign patterns). "
        "Epochs and",
        "seconds: the cost of all the arm's training runs. Arms: the cascade's own stage 0 (baseline); the "
        "cascade;",
        "one baseline trained for all the cascade's epochs, early stopping off (baseline-equal-epochs); the "
        "best on",
        "validation of as many baselines as the cascade trained models (best-of-k)"
        + (
            "; later-layer forgetting with the cascade's budget (forgetting)."
            if "forgetting" in record["arms"]
            else "."
        ),
        "",
        *([f"Note: {record['note']}", ""] if record.get("note") else []),
        f"| arm | test {m} mean ± std | diff vs baseline [95 % CI] | p | better/worse seeds | epochs | "
        "seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lower = record["lower_is_better"]

    def paired_cells(v: dict[str, Any] | None) -> str:
        """Mean difference [95 % CI] | sign-flip p | seeds better/worse for the first of the pair."""
        if v is None:
            return "- | - | -"
        diff = f"{f(v['mean'])} [{f(v['ci95'][0])}, {f(v['ci95'][1])}]" if v["ci95"] else f(v["mean"])
        better, worse = (v["lower"], v["higher"]) if lower else (v["higher"], v["lower"])
        return f"{diff} | {v['p_sign_flip']:.3f} | {better}/{worse}"

    for arm, a in record["arms"].items():
        t = a["test"]
        spread = f" ± {f(t['std'])}" if t["std"] is not None else ""
        lines.append(
            f"| {arm} | {f(t['mean'])}{spread} | {paired_cells(a['vs_baseline'])} | "
            f"{a['epochs']['mean']:.1f} | {a['seconds']['mean']:.1f} |"
        )
    lines += [
        "",
        "Cascade against each control, paired by seed (cascade minus control; "
        f"{'negative' if lower else 'positive'} favours the cascade):",
        "",
        "| control | cascade − control [95 % CI] | p | seeds where the cascade is better/worse |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {arm} | {paired_cells(a['cascade_minus_arm'])} |"
        for arm, a in record["arms"].items()
        if arm != "cascade"
    ]
    lines += ["", "Per seed (test):", "", *table_head(["seed", *record["arms"]])]
    for s in range(record["seeds"]):
        lines.append(
            f"| {s} | " + " | ".join(f(a["per_seed"][s]["test"]) for a in record["arms"].values()) + " |"
        )
    return "\n".join(lines) + "\n\n![test metric per arm](compare.png)\n"


def plot(record: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: a library call leaves the user's backend alone

    m = record["metric"]
    scale, unit = display_scale(m)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    arms = list(record["arms"])
    n = record["seeds"]
    offsets = (
        np.linspace(-0.15, 0.15, n) if n > 1 else np.zeros(1)
    )  # seed j sits at the same offset in every arm
    ys = np.array(
        [[scale * e["test"] for e in record["arms"][arm]["per_seed"]] for arm in arms]
    )  # (arms, seeds)
    for j in range(n):  # thin lines pair each seed across arms
        ax.plot(np.arange(len(arms)) + offsets[j], ys[:, j], color="grey", lw=0.3, alpha=0.5)
    for i in range(len(arms)):
        ax.scatter(i + offsets, ys[i], s=14, alpha=0.7, color=f"C{i}", zorder=3)
        ax.errorbar(
            i + 0.3, ys[i].mean(), yerr=ys[i].std(ddof=1) if n > 1 else 0, fmt="o", color="black", capsize=4
        )
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel(f"test {m}{unit}")
    ax.set_title(f"{record['task']} ({record['preset']}): {record['seeds']} seeds; black = mean ± std")
    save_figure(fig, path)
