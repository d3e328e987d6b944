"""The paper's two motivating observations, for every split k of a task's model.

(a) Within-dataset transfer, from one trained baseline: *retrain-classifier* (frozen feature
    extractor, fresh classifier) against *retrain-feature-extractor* (frozen classifier,
    fresh feature extractor: one cascade stage), each against the baseline.
(b) A classifier trained on more data: *transfer-classifier* (the full-data baseline's
    classifier, frozen; a fresh feature extractor trained on a subset) against a baseline
    trained on the same subset, for each subset fraction.

All runs start from the same baseline checkpoint and live under ``DIR/runs/``; finished
runs are read back, so an interrupted analysis continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from topdown.blocks import usable_splits
from topdown.config import CascadeConfig, RunConfig
from topdown.errors import ConfigError
from topdown.executors import Executor, chosen, in_parallel
from topdown.metrics import display_scale
from topdown.procedures import run_or_resume
from topdown.report import format_metric, save_figure, stage_result, table_head, write_record
from topdown.runs import RunDir
from topdown.task import Task
from topdown.tracking import Tracking

# cascade options that only the retrain-feature-extractor runs (cascade stages) would apply, away from
# their defaults (cascade.splits is set per split by analyse itself)
CASCADE_ONLY = ("candidates", "reinit", "finetune_epochs")


def check_one_recipe(config: RunConfig) -> None:
    """Retraining the classifier and retraining the feature extractor are set side by side, so both
    must train under one recipe: an option only the second would follow (several candidates, a warm
    start, a fine-tune stage) would tilt the comparison without the table saying so."""
    defaults = CascadeConfig.defaults()
    changed = [f"cascade.{key}" for key in CASCADE_ONLY if getattr(config.cascade, key) != defaults[key]]
    if changed:
        raise ConfigError(
            f"analyse: {', '.join(changed)} would change only the retrain-feature-extractor runs "
            "(analyse runs every usable split, each side trained alike); leave them at their defaults"
        )


def split_row(
    task: Task,
    out: Path,
    k: int,
    config: RunConfig,
    subsets: tuple[float, ...],
    seed: int,
    preset: str | None,
    device,
    track: Tracking | None = None,
) -> dict[str, Any]:
    """Every run of split ``k``, from the baseline's checkpoint (independent of other splits)."""
    metric = task.primary.name
    common = dict(seed=seed, preset=preset, device=device, track=track)
    base = run_or_resume("baseline", task, out / "runs" / "baseline", config=config, **common)
    baseline = stage_result(base["stages"][0], metric, "baseline")  # refused before this split's runs train
    ckpt = str(RunDir(out / "runs" / "baseline").checkpoint("best"))
    rc = run_or_resume(
        "retrain-classifier",
        task,
        out / "runs" / f"retrain-classifier-k{k}",
        config=config.updated({"procedure": {"split": k}}),
        from_checkpoint=ckpt,
        **common,
    )
    rfe = run_or_resume(
        "cascade",
        task,
        out / "runs" / f"retrain-feature-extractor-k{k}",
        config=config.updated({"cascade": {"splits": [k]}}),
        from_checkpoint=ckpt,
        **common,
    )
    row = {
        "split": k,
        "baseline": baseline,
        "retrain_classifier": stage_result(rc["stages"][1], metric, f"retrain-classifier-k{k}"),
        "retrain_feature_extractor": stage_result(
            rfe["stages"][1], metric, f"retrain-feature-extractor-k{k}"
        ),
        "subsets": {},
    }
    for fraction in subsets:
        name = f"transfer-k{k}-subset{fraction:g}"
        tr = run_or_resume(
            "transfer-classifier",
            task,
            out / "runs" / name,
            config=config.updated({"procedure": {"split": k, "subset": fraction}}),
            from_checkpoint=ckpt,
            **common,
        )
        row["subsets"][f"{fraction:g}"] = {
            "subset_baseline": stage_result(tr["stages"][1], metric, name),
            "transfer_classifier": stage_result(tr["stages"][2], metric, name),
        }
    return row


def run_analyse(
    task: Task,
    out: str | Path,
    *,
    config: RunConfig,
    seed: int = 0,
    subsets: tuple[float, ...] = (0.25, 0.5),
    preset: str | None = None,
    device=None,
    jobs: int = 1,
    task_factory: Callable[[], Task] | None = None,
    executor: Executor | None = None,
    track: Tracking | str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train one baseline, then every split's runs (in ``jobs`` processes when > 1, or where
    ``executor`` runs them: see ``run_compare``; ``track`` as there)."""
    check_one_recipe(config)
    executor = chosen(executor, jobs, task_factory)
    for (
        fraction
    ) in subsets:  # a fraction outside (0, 1) is refused now, not after the splits before it have trained
        config.updated({"procedure": {"subset": fraction}})
    out = Path(out)
    track = Tracking.of(track).of_runs_in(out)
    metric = task.primary.name
    base = run_or_resume(
        "baseline",
        task,
        out / "runs" / "baseline",
        config=config,
        seed=seed,
        preset=preset,
        device=device,
        track=track,
    )
    # splits with a side that owns no parameter (e.g. lm-awd's embedding with tie=classifier) have
    # nothing to train
    splits = sorted(usable_splits(base["blocks"]))
    rows = in_parallel(
        split_row,
        [(out, k, config, subsets, seed, preset, device, track) for k in splits],
        task,
        executor,
        task_factory,
    )
    record = {
        "task": task.name,
        "preset": preset,
        "seed": seed,
        "metric": metric,
        "lower_is_better": task.primary.lower_is_better,
        "note": task.info.get("note"),
        "blocks": list(base["blocks"]),
        "subsets": [f"{f:g}" for f in subsets],
        "rows": rows,
    }
    write_record(out, "analyse", record, render, plot)
    return record


def render(record: dict[str, Any]) -> str:
    m = record["metric"]
    blocks = record["blocks"]
    head = [
        "split k (feature extractor / classifier)",
        "baseline",
        "retrain classifier",
        "retrain feature extractor",
    ]
    for f in record["subsets"]:
        head += [f"subset {f}: baseline", f"subset {f}: transfer classifier"]
    lines = [
        f"# Analysis on {record['task']} (preset {record['preset']}, seed {record['seed']})",
        "",
        f"Test {m}{display_scale(m)[1]} (validation in brackets). Retrained classifiers, retrained feature",
        "extractors and transfers start from the same trained baseline; subset baselines train from "
        "scratch, and they and",
        "the transfers on the same fixed fraction of the training data. Both retrain columns follow one "
        "recipe.",
        "",
        *([f"Note: {record['note']}", ""] if record.get("note") else []),
        *table_head(head),
    ]

    def cell(x: dict[str, float]) -> str:
        test, val = format_metric(x["test"], m, sign=False), format_metric(x["val"], m, sign=False)
        return f"{test} ({val})"

    for row in record["rows"]:
        k = row["split"]
        cells = [
            f"{k} ({'+'.join(blocks[:k])} / {'+'.join(blocks[k:])})",
            cell(row["baseline"]),
            cell(row["retrain_classifier"]),
            cell(row["retrain_feature_extractor"]),
        ]
        for f in record["subsets"]:
            cells += [
                cell(row["subsets"][f]["subset_baseline"]),
                cell(row["subsets"][f]["transfer_classifier"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n![analysis](analyse.png)\n"


def plot(record: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: a library call leaves the user's backend alone

    m = record["metric"]
    scale, unit = display_scale(m)
    ylabel = f"test {m}{unit}"
    ks = [r["split"] for r in record["rows"]]
    fig = Figure(figsize=(11, 4))
    a, b = fig.subplots(1, 2)
    for key, label in [
        ("baseline", "baseline"),
        ("retrain_classifier", "retrain classifier"),
        ("retrain_feature_extractor", "retrain feature extractor"),
    ]:
        a.plot(ks, [scale * r[key]["test"] for r in record["rows"]], marker="o", label=label)
    a.set(xlabel="split k", ylabel=ylabel, title="(a) within-dataset transfer", xticks=ks)
    a.legend(fontsize=8)
    for i, f in enumerate(record["subsets"]):
        b.plot(
            ks,
            [scale * r["subsets"][f]["subset_baseline"]["test"] for r in record["rows"]],
            ls="--",
            color=f"C{i}",
            label=f"{f} baseline",
        )
        b.plot(
            ks,
            [scale * r["subsets"][f]["transfer_classifier"]["test"] for r in record["rows"]],
            marker="o",
            color=f"C{i}",
            label=f"{f} transfer classifier",
        )
    b.set(xlabel="split k", ylabel=ylabel, title="(b) classifier from more data", xticks=ks)
    b.legend(fontsize=8)
    save_figure(fig, path)
