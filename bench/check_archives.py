"""Rebuild each committed comparison or sweep from its ``runs.tar.xz`` in a temporary directory,
without training, and check that the rebuilt ``compare.json`` (``sweep.json``) holds the committed
one's numbers.

The rebuild is ``topdown compare --runs-from`` with the task, preset, seeds, configuration and arms
the committed ``compare.json`` records (its ``config`` is the recipe as it was then: a preset
changed since is no obstacle). A run the archive lacks, or one whose recorded configuration does not
fit the current code's definition of its arm, stops that comparison's rebuild with the reason. A sweep
is rebuilt as ``topdown sweep --runs-from``, with the axes, arms and recipe its ``sweep.json`` records.

    python bench/check_archives.py [RESULTS_DIR ...]   # default: every committed comparison and sweep
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import topdown.procedures as procedures
from topdown.archive import restore_runs, restore_sweep
from topdown.arms import CONTROLS
from topdown.compare import run_compare
from topdown.errors import TopdownError
from topdown.sweep import run_sweep
from topdown.tasks import make_task, resolve_config

RESULTS = Path(__file__).resolve().parent / "results"


def _refuse_training(procedure: str, task, out: Path, **kw) -> None:
    raise TopdownError(f"{out.name} is not a finished run of the archive: rebuilding would train it")


def archive_of(results: Path) -> Path | None:
    """The runs archive of the comparison in ``results``: its own, or, for a second comparison made
    from the same runs (a subdirectory, such as one without the forgetting arm), its parent's."""
    return next((a for a in (results / "runs.tar.xz", results.parent / "runs.tar.xz") if a.is_file()), None)


def rebuild(results: Path, into: Path) -> dict[str, Any]:
    """The comparison ``results/compare.json`` rebuilt into ``into`` from its runs archive."""
    record = json.loads((results / "compare.json").read_text())
    config = resolve_config(record["task"], record["preset"], record["config"])
    restore_runs(archive_of(results), into / "runs")
    with _no_training():
        return run_compare(
            make_task(record["task"], config.task, None),
            into,
            seeds=record["seeds"],
            config=config,
            preset=record["preset"],
            arms=[arm for arm in record["arms"] if arm not in CONTROLS],
            # recorded since the budget became the largest among the arms; before, the cascade's
            budget_arms=record.get("budget_arms", ["cascade"]),
        )


def rebuild_sweep(results: Path, into: Path) -> dict[str, Any]:
    """The sweep ``results/sweep.json`` rebuilt into ``into`` from its runs archive."""
    record = json.loads((results / "sweep.json").read_text())
    config = resolve_config(record["task"], record["preset"], record["config"])
    restore_sweep(results / "runs.tar.xz", into)
    with _no_training():
        return run_sweep(
            make_task(record["task"], config.task, None),
            into,
            seeds=record["seeds"],
            axes=record["axes"],
            config=config,
            preset=record["preset"],
            arms=record["arms"],
            budget_arms=record["budget_arms"],
            task_factory=lambda sections: make_task(record["task"], sections, None),
        )


@contextlib.contextmanager
def _no_training():
    """While rebuilding: a run the archive lacks stops the rebuild instead of training."""
    train, procedures.run_procedure = procedures.run_procedure, _refuse_training
    try:
        yield
    finally:
        procedures.run_procedure = train


def differences(committed: dict[str, Any], rebuilt: dict[str, Any]) -> list[str]:
    """The keys of the committed record whose values the rebuilt one does not share, as dotted paths
    (lists by index); a key the committed record lacks (a field recorded since) is not compared."""
    if isinstance(committed, dict) and isinstance(rebuilt, dict):
        return [
            f"{key}{'.' + sub if sub else ''}"
            for key in sorted(committed, key=str)
            for sub in differences(committed.get(key), rebuilt.get(key))
        ]
    if isinstance(committed, list) and isinstance(rebuilt, list) and len(committed) == len(rebuilt):
        return [
            f"{i}{'.' + sub if sub else ''}"
            for i, (c, r) in enumerate(zip(committed, rebuilt))
            for sub in differences(c, r)
        ]
    return [] if committed == rebuilt else [""]


def check(results: Path) -> str:
    """One line: does the comparison (or sweep) in ``results`` rebuild from its runs archive with the
    same numbers?"""
    sweep = (results / "sweep.json").is_file() and (results / "runs.tar.xz").is_file()
    if not sweep and (not (results / "compare.json").is_file() or archive_of(results) is None):
        return "no compare.json (or sweep.json) and runs.tar.xz to rebuild from"
    committed = json.loads((results / ("sweep.json" if sweep else "compare.json")).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rebuilt = json.loads(json.dumps((rebuild_sweep if sweep else rebuild)(results, Path(tmp))))
        except TopdownError as e:
            return f"not rebuilt: {str(e).replace(tmp + '/', '')}"
    diff = differences(committed, rebuilt)
    numbers = [k for k in diff if not k.startswith(("config.", "note"))]
    recorded = f" (recorded differently: {', '.join(k for k in diff if k not in numbers)})"
    return ("differs in " + ", ".join(numbers) if numbers else "same numbers") + (
        recorded if len(diff) > len(numbers) else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="results directories (default: every one)")
    args = parser.parse_args()
    dirs = args.dirs or sorted(
        {p.parent for p in RESULTS.glob("**/compare.json") if archive_of(p.parent)}
        | {p.parent for p in RESULTS.glob("**/sweep.json") if (p.parent / "runs.tar.xz").is_file()}
    )
    lines = {d: check(d) for d in dirs}
    for d, line in lines.items():
        print(f"{d.relative_to(RESULTS) if d.is_relative_to(RESULTS) else d}: {line}")
    sys.exit(any(not line.startswith("same numbers") for line in lines.values()))


if __name__ == "__main__":
    main()
