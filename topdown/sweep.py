"""A sweep: one fair comparison (``topdown.compare``) per cell of a grid of configuration values
(docs/usage.md, "Sweeps").

Each axis is a config key, as ``--set`` names it, with the values it takes (``--axis
train.lr=0.001,0.003``); the cells are the axes' product, in the order the axes and their values
were given. A cell's configuration is the sweep's own with the cell's values set, checked as a
``--set`` is, every cell before anything runs. Each cell is an ordinary comparison directory,
``DIR/cells/KEY=VALUE,KEY=VALUE`` (``compare.json``, ``.md``, ``.png`` and its ``runs/``), that
``topdown compare`` with those ``--set`` values would continue; all the cells' runs go to one pool of
workers (``arms.run_scheduled``), so ``--jobs`` workers stay busy across cells. Finished runs are
never trained again: the same command continues a sweep, and one with more values keeps the cells
it had. ``DIR/sweep.json``, ``.md`` and ``.png`` gather each cell's arms as its ``compare.json`` has
them: their mean test metric and their paired difference to the baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topdown import compare, compare_report
from topdown.arms import (
    DEFAULT_ARMS,
    ComparisonRuns,
    RunOrder,
    Scheduled,
    Submit,
    resolve_arms,
    run_one,
    run_scheduled,
)
from topdown.config import METHOD_SECTIONS, RunConfig
from topdown.errors import ConfigError
from topdown.executors import Executor, chosen
from topdown.metrics import display_scale
from topdown.report import format_metric, save_figure, table_head, write_record
from topdown.sections import CommandLineValue, TaskSections
from topdown.task import Task
from topdown.tracking import Tracking

TaskFactory = Callable[[TaskSections], Task]  # a cell's task, from its configuration's task sections


def parse_axis(text: str) -> tuple[str, list[CommandLineValue]]:
    """``--axis KEY=V1,V2,...``: the key and its values as typed, each read later as ``--set`` reads
    it (``CommandLineValue``). Commas inside brackets, braces or quotes belong to the value
    (``cascade.splits=[3,1],[2,1]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--axis expects KEY=VALUE[,VALUE...], got {text!r}")
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw + ","):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    if any(not v.strip() for v in values):
        raise ConfigError(f"--axis {text}: an empty value (KEY=VALUE[,VALUE...])")
    return key.strip(), [CommandLineValue(v) for v in values]


def parse_axes(texts: Sequence[str]) -> dict[str, list[CommandLineValue]]:
    """Every ``--axis``, by key; a key given twice is refused."""
    axes: dict[str, list[CommandLineValue]] = {}
    for text in texts:
        key, values = parse_axis(text)
        if key in axes:
            raise ConfigError(f"--axis {key} is given twice; give all its values in one --axis")
        axes[key] = values
    return axes


def value_text(value: Any) -> str:
    """A config value as a cell's name and sweep.md show it: text as it is, a whole float without
    its ``.0``, a list's items joined by ``-``."""
    if isinstance(value, list):
        return "-".join(value_text(v) for v in value)
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text[:-2] if isinstance(value, float) and text.endswith(".0") else text


def _in_a_name(text: str) -> str:
    """``text`` where a directory's name holds it: a character other than a letter, digit, ``.``,
    ``+`` or ``-`` becomes ``_``."""
    return re.sub(r"[^\w.+-]", "_", text)


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys and their values as the nested changes ``RunConfig.updated`` takes."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        *sections, leaf = key.split(".")
        node = changes
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return changes


def _value_at(config: RunConfig, key: str) -> Any:
    """The value of the dotted ``key`` in ``config``, as it holds it (typed)."""
    value: Any = config.as_dict()
    for part in key.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep: its name (its directory under ``cells/``), its values by axis key (as
    its configuration holds them, typed) and its configuration."""

    name: str
    values: dict[str, Any]
    config: RunConfig


def sweep_cells(config: RunConfig, axes: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """The cells of ``axes`` (key -> values, each a Python value or a ``--set`` text as
    ``CommandLineValue``) over ``config``, each value checked as ``--set`` checks it and every cell's
    configuration built, so that a bad key or value is refused before anything runs. Refused too: no
    axis, an axis without values, a value given twice."""
    if not axes:
        raise ConfigError("a sweep needs an axis (--axis KEY=VALUE[,VALUE...])")
    typed: dict[str, list[Any]] = {}
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"--axis {key}: no values")
        typed[key] = []
        for value in values:
            shown = value.text if isinstance(value, CommandLineValue) else value
            try:
                changed = config.updated(_nested({key: value}))
            except ConfigError as e:
                raise ConfigError(f"--axis {key}={shown}: {e}") from None
            if (read := _value_at(changed, key)) in typed[key]:
                raise ConfigError(f"--axis {key} gives {value_text(read)} twice")
            typed[key].append(read)
    cells = []
    for values in itertools.product(*typed.values()):
        cell_values = dict(zip(typed, values))
        name = ",".join(f"{k}={_in_a_name(value_text(v))}" for k, v in cell_values.items())
        try:  # all at once: values each fine alone may not be together (two fractions above 1)
            cells.append(Cell(name, cell_values, config.updated(_nested(cell_values))))
        except ConfigError as e:
            raise ConfigError(f"cell {name}: {e}") from None
    if len({c.name for c in cells}) < len(cells):
        raise ConfigError(
            "two cells would share a directory name: axis values that differ only in characters "
            "a directory name cannot hold"
        )
    return cells


_built: dict[str, Task] = {}  # this process's task for the cell whose run it ran last


def cell_task(task_factory: TaskFactory, sections: TaskSections) -> Task:
    """The task of a cell's ``sections``, built once in a row: a process keeps only the last one it
    built (cells may each hold a different data set, and a worker's runs come cell after cell)."""
    key = json.dumps(
        {name: dataclasses.asdict(s) for name, s in sections.items()}, sort_keys=True, default=str
    )
    if key not in _built:
        _built.clear()
        _built[key] = task_factory(sections)
    return _built[key]


def _cell_run(
    worker_task: Task, task_factory: TaskFactory | None, sections: TaskSections | None, *args: Any
) -> dict[str, Any]:
    """One run of a cell (a worker's unit of work): on the worker's own task where the cell's task
    sections are the sweep's (``sections`` None), else on the cell's task (``cell_task``)."""
    task = worker_task if sections is None else cell_task(task_factory, sections)
    return run_one(task, *args)


def run_sweep(
    task: Task,
    out: str | Path,
    *,
    seeds: int,
    axes: Mapping[str, Sequence[Any]],
    config: RunConfig,
    arms: Sequence[str] = DEFAULT_ARMS,
    budget_arms: Sequence[str] | None = None,
    preset: str | None = None,
    device=None,
    jobs: int = 1,
    task_factory: TaskFactory | None = None,
    executor: Executor | None = None,
    track: Tracking | str | Sequence[str] | None = None,
    effect: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) a fair comparison (``compare.run_compare``, same arguments) per cell of
    ``axes`` (config key -> its values: Python values, or ``--set`` texts as ``CommandLineValue``s) in
    ``out/cells/NAME``, all the cells' runs in one pool of ``jobs`` workers; write each cell's
    ``compare.*`` as soon as its runs have finished, and at the end ``sweep.json``, ``sweep.md``,
    ``sweep.png``. ``task`` is built on ``config``; ``task_factory(sections)`` builds the task of a
    cell whose task sections differ (an axis such as ``model.hidden`` or ``data.*``), and the
    workers' tasks when ``jobs`` > 1 or an ``executor`` (``topdown.executors``) runs the runs
    elsewhere. ``track``: trackers every run also logs to, as
    ``run_compare``'s, with one MLflow store for the sweep and an experiment per cell. ``effect`` (as
    ``run_compare``'s, in display units): per cell and difference, the seeds one of that size would
    need, so that a sweep says where its seeds fall short of the resolution wanted."""
    compare.check_seeds(seeds)
    compare.check_effect(effect)
    cells = sweep_cells(config, axes)
    arms = resolve_arms(arms)
    own = [cell.config.task == config.task for cell in cells]  # the cells that run on ``task`` itself
    if task_factory is None and not all(own):
        task_keys = [k for k in axes if k.split(".")[0] not in METHOD_SECTIONS]
        raise ConfigError(f"--axis {', '.join(task_keys)} changes the task: the sweep needs a task_factory")
    out = Path(out)
    scale, _ = display_scale(task.primary.name)
    effect = None if effect is None else effect / scale

    def task_of(cell: Cell, same: bool) -> Task:
        return task if same else cell_task(task_factory, cell.config.task)

    comparisons = [ComparisonRuns(out / "cells" / cell.name / "runs", arms, budget_arms) for cell in cells]
    base_factory = functools.partial(task_factory, config.task) if task_factory is not None else None
    executor = chosen(executor, jobs, base_factory)
    tracking = Tracking.of(track).of_runs_in(out)
    with executor.open(task, base_factory) as workers:

        def submitter(cell: Cell, same: bool) -> Submit:
            sections = None if same else cell.config.task  # None: the worker's own task
            experiment = f"{tracking.experiment}/{cell.name}" if tracking.experiment else None
            cell_tracking = dataclasses.replace(tracking, experiment=experiment)

            def submit(name: str, order: RunOrder) -> Future:
                args = (out / "cells" / cell.name, name, order, preset, device, cell_tracking)
                return workers.submit(_cell_run, task_factory, sections, *args)

            return submit

        records: dict[int, dict[str, Any]] = {}

        def cell_finished(i: int, cell_runs: list[dict[str, dict[str, Any]]]) -> None:
            """A cell whose runs have all finished: its compare.* written now, not at the sweep's end."""
            cell = cells[i]
            record = compare.comparison_record(
                task_of(cell, own[i]), comparisons[i], cell.config, preset, cell_runs, effect
            )
            write_record(
                out / "cells" / cell.name, "compare", record, compare_report.render, compare_report.plot
            )
            records[i] = record

        run_scheduled(
            [
                Scheduled.of(task_of(cell, same), comparison, seeds, cell.config, submitter(cell, same))
                for cell, same, comparison in zip(cells, own, comparisons)
            ],
            cell_finished,
        )
    results = [(cell, records[i]) for i, cell in enumerate(cells)]
    _built.clear()  # the last cell's task: not kept past the sweep
    record = sweep_record(task, config, preset, seeds, comparisons[0], results, effect)
    write_record(out, "sweep", record, render, plot)
    return record


def sweep_record(
    task: Task,
    config: RunConfig,
    preset: str | None,
    seeds: int,
    comparison: ComparisonRuns,
    results: list[tuple[Cell, dict[str, Any]]],
    effect: float | None = None,
) -> dict[str, Any]:
    """``sweep.json``: the arms and budget arms every cell compares (``comparison``: any cell's, they
    share them), the ``effect`` (metric units) whose seeds needed each difference records, if any, and
    per cell its values and, per arm and control, its test metric (mean, std) and
    paired difference to the baseline (``vs_baseline``) as the cell's ``compare.json`` has them, and
    the arms whose intervals lie on the better side of every control's (``beats_every_control``)."""
    return {
        "task": task.name,
        "preset": preset,
        "seeds": seeds,
        "metric": task.primary.name,
        "lower_is_better": task.primary.lower_is_better,
        "config": config.as_dict(),
        "arms": list(comparison.arms),
        "budget_arms": list(comparison.budget_arms),
        **({"effect": effect} if effect is not None else {}),
        "axes": _axes([cell.values for cell, _ in results]),
        "cells": [
            {
                "name": cell.name,
                "dir": f"cells/{cell.name}",
                "values": cell.values,
                "arms": {
                    arm: {"test": a["test"], "vs_baseline": a["vs_baseline"]}
                    for arm, a in record["arms"].items()
                },
                "beats_every_control": [a for a, v in record["arms"].items() if v.get("beats_every_control")],
            }
            for cell, record in results
        ],
    }


def _axes(cells: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each axis's values, in the order the cells (their ``values``) take them."""
    axes: dict[str, list[Any]] = {key: [] for key in cells[0]}
    for values in cells:
        for key, value in values.items():
            if value not in axes[key]:
                axes[key].append(value)
    return axes


def _difference(v: dict[str, Any] | None, metric: str) -> str:
    """A paired difference to the baseline as sweep.md shows it: mean [95 % CI], sign-flip p."""
    if v is None:
        return "-"

    def f(x: float) -> str:
        return format_metric(x, metric, sign=False)

    ci = f" [{f(v['ci95'][0])}, {f(v['ci95'][1])}]" if v["ci95"] else ""
    return f"{f(v['mean'])}{ci}, p {v['p_sign_flip']:.3f}"


def _varying(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """The cell's paired differences to the baseline that vary over seeds: an arm that kept the
    baseline's model on every seed (a difference of zero throughout) says nothing of the spread."""
    return [v for v in (a["vs_baseline"] for a in cell["arms"].values()) if v and v["std"]]


def _resolution(cell: dict[str, Any], metric: str) -> str:
    """The smallest paired difference to the baseline the cell's seeds could detect (``detectable``,
    α 0.05, power 0.8), from its best- to its worst-resolved arm: what "no difference" there can mean."""
    return _span([v["detectable"] for v in _varying(cell)], lambda x: format_metric(x, metric, sign=False))


def _seeds_needed(cell: dict[str, Any]) -> str:
    """The seeds the cell's differences to the baseline would need to detect the sweep's effect, from
    its best- to its worst-resolved arm ("-": no difference varies over seeds yet)."""
    return _span([v["seeds_needed"] for v in _varying(cell)], str)


def _span(values: list[Any], shown: Callable[[Any], str]) -> str:
    """From the smallest of ``values`` to the largest, as sweep.md shows a range ("-": none)."""
    if not values:
        return "-"
    low, high = shown(min(values)), shown(max(values))
    return low if low == high else f"{low}–{high}"


def _winners(cell: dict[str, Any]) -> str:
    """The arms that beat every control in a cell, as sweep.md shows them ("-": a sweep.json written
    before they were recorded)."""
    if "beats_every_control" not in cell:
        return "-"
    return ", ".join(cell["beats_every_control"]) or "none"


def render(record: dict[str, Any]) -> str:
    m, cells, keys = record["metric"], record["cells"], list(record["axes"])
    _, unit = display_scale(m)
    arms = [arm for arm in cells[0]["arms"] if arm != "baseline"]
    effect = record.get("effect")
    effect_text = format_metric(effect, m, sign=False) if effect is not None else None
    needed = f"seeds for {effect_text}" if effect_text else None
    lines = [
        f"# Sweep on {record['task']} (preset {record['preset']}, {record['seeds']} seeds): "
        + " × ".join(keys)
        + f", {len(cells)} cells",
        "",
        *textwrap.wrap(
            "Per cell, a fair comparison (its compare.md, linked, has the rest): the baseline's test "
            f"{m}{unit}, mean ± std over seeds, and each arm's and control's difference to it, paired by "
            "seed: mean [95 % Student-t interval], sign-flip p "
            f"({'lower' if record['lower_is_better'] else 'higher'} is better); the smallest difference "
            "to the baseline the cell's seeds could detect (α 0.05, power 0.8, from the paired spread; "
            "the range over its arms whose difference varies over seeds)"
            + (
                f"; the seeds a difference of {effect_text} would need there "
                "(80 % power, two-sided 5 %, at each arm's paired spread; the range over the same arms)"
                if effect_text
                else ""
            )
            + "; then the arms that beat "
            "every control there (each paired 95 % interval, against the baseline, the equal-epochs "
            "baseline, best-of-k and any control plan such as restarts, wholly on the better side of zero; "
            "the cell's compare.md has the table). sweep.png plots the differences against the first axis, "
            "a panel per value of the others.",
            100,
            break_on_hyphens=False,
        ),
        "",
        *table_head(
            [
                *keys,
                f"baseline {m}",
                *[f"{arm} − baseline" for arm in arms],
                "detectable",
                *([needed] if needed else []),
                "beats every control",
                "cell",
            ]
        ),
    ]
    for cell in cells:
        base = cell["arms"]["baseline"]["test"]
        spread = f" ± {format_metric(base['std'], m, sign=False)}" if base["std"] is not None else ""
        row = [
            *[value_text(cell["values"][k]) for k in keys],
            format_metric(base["mean"], m, sign=False) + spread,
            *[_difference(cell["arms"][arm]["vs_baseline"], m) for arm in arms],
            _resolution(cell, m),
            *([_seeds_needed(cell)] if needed else []),
            _winners(cell),
            f"[compare]({cell['dir']}/compare.md)",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n![each arm's difference to the baseline, the regime map](sweep.png)\n"


def plot(record: dict[str, Any], path: Path) -> None:
    """The regime map: each arm's difference to the baseline (mean, 95 % interval) against the first
    axis, one panel per combination of the other axes' values (rows: the second axis's; columns: the
    rest's), one line per arm, on one y scale, so that a regime reads across panels as well as along
    them (one line per arm and per other value in one panel is a tangle from three axes on)."""
    from matplotlib.figure import Figure  # not pyplot: a library call leaves the user's backend alone

    m, cells, axes = record["metric"], record["cells"], record["axes"]
    scale, unit = display_scale(m)
    arms = [arm for arm in cells[0]["arms"] if arm != "baseline"]
    first, *others = axes
    rows = [None] if not others else axes[others[0]]
    columns = list(itertools.product(*(axes[k] for k in others[1:])))
    fig = Figure(figsize=(4.5 * len(columns) + 2.5, 3.2 * len(rows) + 1.0))
    panels = fig.subplots(len(rows), len(columns), squeeze=False, sharey=True)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            ax = panels[r][c]
            fixed = dict(zip(others, (row, *column)))  # {} for one axis
            for a, arm in enumerate(arms):
                offset = 0.25 * (a / max(len(arms) - 1, 1) - 0.5)  # bars side by side
                xs, ys, below, above = [], [], [], []
                for x, value in enumerate(axes[first]):
                    wanted = {first: value, **fixed}
                    cell = next(
                        other for other in cells if all(other["values"][k] == v for k, v in wanted.items())
                    )
                    v = cell["arms"][arm]["vs_baseline"]
                    lo, hi = v["ci95"] or (v["mean"], v["mean"])
                    xs.append(x + offset)
                    ys.append(scale * v["mean"])
                    below.append(scale * (v["mean"] - lo))
                    above.append(scale * (hi - v["mean"]))
                ax.errorbar(xs, ys, yerr=[below, above], color=f"C{a}", marker="o", capsize=3, label=arm)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(range(len(axes[first])), [value_text(v) for v in axes[first]])
            if fixed:
                ax.set_title(", ".join(f"{k}={value_text(v)}" for k, v in fixed.items()), fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel(first)
            if c == 0:
                ax.set_ylabel(f"arm − baseline, test {m}{unit}")
    panels[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"{record['task']} ({record['preset']}), {record['seeds']} seeds\n"
        "each arm's mean paired difference to the baseline and its 95 % interval",
        fontsize=10,
    )
    save_figure(fig, path)
