"""Render a run directory's record as ``report.md`` (the stage table) and ``curves.png``."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from topdown.errors import TopdownError
from topdown.files import atomic_write, os_reason, write_json
from topdown.metrics import display_scale
from topdown.resets import in_words
from topdown.runs import RunDir


def format_metric(value: float | None, metric: str, sign: bool = True) -> str:
    """A metric for a table: rates as percentages (with a % sign unless ``sign`` is False)."""
    if value is None:
        return "-"
    scale, _ = display_scale(metric)
    if scale != 1:  # a rate
        return f"{scale * value:.2f}{' %' if sign else ''}"
    return f"{value:.4g}"


def stage_result(stage: dict[str, Any], metric: str, run: str) -> dict[str, float]:
    """A recorded stage's validation and test ``metric``, for a command that tabulates many runs
    (compare, analyse). A test value recorded as null (NaN or infinite when measured) or never
    measured can be neither averaged nor plotted: refused, naming ``run``."""
    if stage["test"].get(metric) is None:
        why = "is NaN or infinite (recorded as null)" if metric in stage["test"] else "was not measured"
        raise TopdownError(
            f"{run}: the test {metric} of stage {stage['index']} {why}, so it cannot be tabulated with the "
            "others; see `topdown report` of that run, and remove its directory to train it again"
        )
    return {"val": stage["val"][metric], "test": stage["test"][metric]}


def table_head(columns: list[str]) -> list[str]:
    """A markdown table's header row and rule, for the tables the commands write."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def save_figure(fig: Any, path: Path) -> None:
    """Lay out a matplotlib ``Figure`` and write it as a PNG, atomically."""
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))


def write_record(
    out: Path,
    stem: str,
    record: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """Write a multi-run command's ``stem.json``, ``stem.md`` and ``stem.png`` (compare, analyse)."""
    write_json(out / f"{stem}.json", record)
    atomic_write(out / f"{stem}.md", lambda p: p.write_text(render(record)))
    plot(record, out / f"{stem}.png")


def stage_reset(stage: dict[str, Any]) -> str:
    """What a recorded stage did to its start weights, in words: "new model" (built afresh), the
    resets it applied (``resets.in_words``), or "-" (kept as they were: a fine-tune, a warm start, a
    loaded model). A stage recorded before resets were recorded says it by ``reinit``; a stage 0
    taken from another run (``adopt``) names that run."""
    if "adopted_from" in stage:
        return f"new model, trained in {stage['adopted_from']}"
    if "reset" not in stage:
        if not stage["reinit"]:
            return "-"
        return "re-initialised: " + ", ".join(stage.get("reinit_blocks") or stage["trained_blocks"])
    if stage["reset"]:
        return "; ".join(in_words(entry) for entry in stage["reset"])
    return "new model" if stage["reinit"] else "-"


def stage_table(summary: dict[str, Any]) -> str:
    """The stage table as markdown: one row per stage, the chosen one marked."""
    metric = summary["metric"]
    # one more column: the first other metric the task's validation recorded (the built-in tasks list theirs
    # after the primary one: cer beside wer, loss beside ppl or error)
    extra = [m for m in summary["stages"][0]["val"] if m != metric][:1] if summary["stages"] else []
    cols = [metric, *extra]
    head = [
        "stage",
        "role",
        "split",
        "reset",
        "trained blocks",
        "frozen blocks",
        "epochs",
        *[f"val {m}" for m in cols],
        *[f"test {m}" for m in cols],
        "accepted",
        "seconds",
    ]
    rows = table_head(head)
    for s in summary["stages"]:
        mark = " (chosen)" if s["index"] == summary["chosen_stage"] else ""
        accepted = "-" if s["accepted"] is None else ("yes" if s["accepted"] else "no")
        cells = [
            f"{s['index']}{mark}",
            s["role"],
            "-" if s["split"] is None else str(s["split"]),
            stage_reset(s),
            ", ".join(s["trained_blocks"]) or "-",
            ", ".join(s["frozen_blocks"]) or "-",
            str(s["epochs"]),
            *[format_metric(s["val"].get(m), m) for m in cols],
            *[format_metric(s["test"].get(m), m) for m in cols],
            accepted,
            f"{s['seconds']:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def runs_of(path: str | Path) -> Path | None:
    """The directory holding the runs of ``path`` when it is not a run itself: a comparison's or
    analysis's ``runs/``, or any directory of run directories (e.g. an ablation's); else None."""
    path = Path(path)
    try:
        if (path / "summary.json").exists() or not path.is_dir():
            return None
        if (path / "runs").is_dir():
            return path / "runs"
        return path if any((p / "summary.json").is_file() for p in path.iterdir()) else None
    except OSError as e:  # a directory that may not be entered
        raise TopdownError(f"cannot read {path}: {os_reason(e)}") from None


def sweep_cells_of(path: str | Path) -> Path | None:
    """A sweep's ``cells/`` when ``path`` is a sweep's directory (``topdown sweep --out``), else None."""
    cells = Path(path) / "cells"
    try:
        return cells if cells.is_dir() and not (Path(path) / "summary.json").exists() else None
    except OSError as e:
        raise TopdownError(f"cannot read {path}: {os_reason(e)}") from None


def sweep_table(cells: Path) -> str:
    """Where each cell of a sweep in progress stands: how many of its runs have finished, have
    started and not finished (under way or stopped) or have failed, and whether its compare.md is
    written (the sweep writes a cell's as soon as all its runs have finished)."""
    rows = table_head(["cell", "runs finished", "unfinished", "failed", "compare.md"])
    for cell in sorted(p for p in cells.iterdir() if p.is_dir()):
        runs = [p for p in (cell / "runs").glob("*") if p.is_dir()] if (cell / "runs").is_dir() else []
        status = [(RunDir(run).read_summary() or {}).get("status") for run in runs]
        written = "yes" if (cell / "compare.md").is_file() else "not yet"
        counts = [
            status.count("complete"),
            status.count("running") + status.count(None),
            status.count("failed"),
        ]
        rows.append(f"| {cell.name} | " + " | ".join(map(str, counts)) + f" | {written} |")
    return "\n".join(rows)


def runs_table(runs: Path) -> str:
    """Where each run under ``runs`` stands, for a long comparison in progress: finished, or the
    stage and epoch it has reached, and the chosen model's metrics."""
    head = ["run", "procedure", "status", "stages done", "in progress", "chosen val", "chosen test"]
    rows = table_head(head)
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        summary = RunDir(run).read_summary()
        if summary is None:
            rows.append(f"| {run.name} | - | not started | 0 | - | - | - |")
            continue
        done, metric = summary["stages"], summary["metric"]
        at = "-"
        if summary["status"] != "complete":
            at = _stage_progress(
                len(done), [r for r in RunDir(run).read_metrics() if r.get("stage") == len(done)]
            )
        chosen = done[summary["chosen_stage"]] if summary["chosen_stage"] is not None else None
        val, test = (
            (format_metric(chosen[split].get(metric), metric) for split in ("val", "test"))
            if chosen
            else ("-", "-")
        )
        cells = [run.name, summary["procedure"], summary["status"], str(len(done)), at, val, test]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _stage_progress(stage: int, lines: list[dict[str, Any]]) -> str:
    """``stage 1, epoch 7 of 40, at most 1.2 h left in it``: the epoch reached by the stage's current
    candidate, its budget, and the time the rest of the budget takes at the recent epochs' pace."""
    if not lines:
        return f"stage {stage}, starting"
    last = max(lines, key=lambda r: (r.get("candidate", 0), r["epoch"]))
    where = f"stage {stage}" + (f" (candidate {last['candidate'] + 1})" if last.get("candidate") else "")
    if (
        "max_epochs" not in last or "seconds" not in last
    ):  # a loop of the user's own, or an older topdown, wrote it
        return f"{where}, epoch {last['epoch']}"
    seconds = {
        r["epoch"]: r["seconds"]
        for r in lines
        if r.get("candidate") == last.get("candidate") and "seconds" in r
    }
    epochs = sorted(seconds)  # a resumed run logs an epoch again: its later line wins
    durations = [seconds[b] - seconds[a] for a, b in zip(epochs, epochs[1:]) if b == a + 1][-5:]
    # the median of the last five epochs: one epoch slowed by another process does not set the estimate
    pace = statistics.median(durations) if durations else last["seconds"] / last["epoch"]
    hours = (last["max_epochs"] - last["epoch"]) * pace / 3600
    return f"{where}, epoch {last['epoch']} of {last['max_epochs']}, at most {hours:.1f} h left in it"


def plot_curves(summary: dict[str, Any], metrics: list[dict[str, Any]], path: Path) -> None:
    """Validation metric and training loss per epoch, stages laid end to end; a star marks the
    epoch each stage kept (``kept_epoch``, on its chosen candidate's curve)."""
    from matplotlib.figure import Figure  # not pyplot: a library call leaves the user's backend alone

    metric = summary["metric"]
    fig = Figure(figsize=(11, 4))
    ax_val, ax_loss = fig.subplots(1, 2)
    offset, losses, kept_label = 0, [], "kept epoch"
    for stage in summary["stages"]:
        kept = stage.get("kept_epoch")  # None: an average of epochs, or a run recorded without it
        chosen = next((c for c, t in enumerate(stage["candidates"]) if t["val"] == stage["val"]), 0)
        for c in range(max(1, len(stage["candidates"]))):
            rows = [r for r in metrics if r["stage"] == stage["index"] and r["candidate"] == c]
            if not rows:
                continue
            x = [offset + r["epoch"] for r in rows]
            label = f"stage {stage['index']} ({stage['role']})" if c == 0 else None
            color = f"C{stage['index'] % 10}"
            ax_val.plot(x, [r["val"].get(metric) for r in rows], marker=".", color=color, label=label)
            if c == chosen and (row := next((r for r in rows if r["epoch"] == kept), None)) is not None:
                ax_val.plot(
                    offset + kept,
                    row["val"].get(metric),
                    marker="*",
                    markersize=13,
                    markerfacecolor="white",  # on its stage's curve; one look in the legend
                    markeredgecolor="black",
                    linestyle="none",
                    label=kept_label,
                )
                kept_label = None  # one legend entry for every stage's star
            loss = [r.get("train_loss") for r in rows]
            losses += [v for v in loss if v is not None]
            ax_loss.plot(x, loss, marker=".", color=color, label=label)
        offset += max([r["epoch"] for r in metrics if r["stage"] == stage["index"]], default=0)
    ax_val.set(
        xlabel="epoch (stages end to end)",
        ylabel=f"validation {metric}",
        title=f"{summary['task']}: {summary['procedure']}",
    )
    # a log scale shows the loss's decay, but a loss of 0 (or below, with a regulariser) has no
    # logarithm: matplotlib then warns on stderr and drops the points, so such a plot stays linear
    ax_loss.set(
        xlabel="epoch (stages end to end)",
        ylabel="training loss",
        yscale="log" if all(v > 0 for v in losses) else "linear",
    )
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=8)
    save_figure(fig, path)


def reported_lines(summary: dict[str, Any]) -> list[str]:
    """The models a plan reports beside its stages (Knowledge Evolution's slim model), a line per
    stage: recorded, never used to choose."""
    metric = summary["metric"]
    lines = [
        f"- stage {s['index']}, {name}: val {format_metric(m['val'].get(metric), metric)}, "
        f"test {format_metric(m['test'].get(metric), metric)}"
        for s in summary["stages"]
        for name, m in s.get("reported", {}).items()
    ]
    return ["Reported beside the stages (never used to choose):", "", *lines, ""] if lines else []


def render(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    chosen = summary["chosen_stage"]
    direction = "lower" if summary["lower_is_better"] else "higher"
    preset = (
        "" if summary["preset"] is None else f"preset {summary['preset']}, "
    )  # a plan driven by one's own loop has none
    lines = [
        f"# {summary['procedure']} on {summary['task']} ({preset}seed {summary['seed']})",
        "",
        f"Status: {summary['status']}. Primary metric: {metric} ({direction} is better).",
        "Stages are accepted or rejected on validation; the test column is reported, never used to choose.",
        "",
        *([f"Note: {note}", ""] if (note := summary.get("task_info", {}).get("note")) else []),
        stage_table(summary),
        "",
    ]
    if chosen is not None and summary["test"]:
        tests = ", ".join(f"{k} {format_metric(v, k)}" for k, v in summary["test"].items())
        lines += [f"Chosen model: stage {chosen}. Test: {tests}.", ""]
    lines += reported_lines(summary)
    lines += ["![learning curves](curves.png)", ""]
    return "\n".join(lines)


def read(path: str | Path) -> dict[str, Any]:
    """The run record of the run directory ``path``."""
    summary = RunDir(path).read_summary()
    if summary is None:
        raise TopdownError(f"{path} holds no run (no summary.json)")
    return summary


def write(path: str | Path) -> Path:
    """(Re-)render ``report.md`` and ``curves.png`` of the run directory ``path``."""
    run = RunDir(path)
    summary = read(path)
    plot_curves(summary, run.read_metrics(), run.path / "curves.png")
    out = run.path / "report.md"
    atomic_write(out, lambda p: p.write_text(render(summary)))
    return out
