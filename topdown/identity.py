"""What identifies a run, and why a recorded run is not the one a command describes.

A resumed run (``--resume``) or a reused one (``compare``/``analyse`` run again) must be the same
experiment as the command: same procedure, task, preset, seed, configuration, metric and data,
and, for a run built on a ``--from`` checkpoint, the same starting weights. Anything else would
silently mix two experiments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from topdown.config import RunConfig
from topdown.files import weights_digest
from topdown.metrics import Metric
from topdown.pretrained import read_start
from topdown.task import DATA_DIR


def run_identity(
    procedure: str,
    name: str,
    preset: str | None,
    seed: int,
    config: RunConfig,
    metric: Metric,
    task_info: Mapping[str, Any],
) -> dict[str, Any]:
    """What identifies a run: a resumed run (``Plan``) or a reused one (``run_or_resume``) must match
    it exactly; ``task_info`` describes the data it trains on, ``metric`` what accepts its stages."""
    return {
        "procedure": procedure,
        "task": name,
        "preset": preset,
        "seed": seed,
        "config": config.as_dict(),
        "metric": metric.name,
        "lower_is_better": metric.lower_is_better,
        "task_info": dict(task_info),
    }


_ABSENT = object()


def _close(a: Any, b: Any) -> bool:
    """Equal, or two floats equal to 1e-5 relative: statistics a task records (e.g. normalisation
    means) computed from the same data on another CPU differ in their last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


# A procedure's former name -> its name now: a run recorded under the former name is the same
# procedure, so it is still resumed and reused (and a comparison finds its runs under their
# former names, ``arms.Arms.run``).
FORMER_NAMES = {"forget": "forgetting"}


def current_name(procedure: str) -> str:
    """The name ``procedure`` has now (itself unless it is a former name)."""
    return FORMER_NAMES.get(procedure, procedure)


def former_names(procedure: str) -> list[str]:
    """The names ``procedure`` had before."""
    return [old for old, new in FORMER_NAMES.items() if new == procedure]


LOCATION_KEYS = (DATA_DIR,)  # task_info keys that say where the data is, not what it is


def first_difference(
    recorded: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any] | None = None
) -> str | None:
    """The first key of ``wanted`` whose value the run record does not share, named for an error
    message (with the dotted paths that differ inside a nested dict, e.g. ``'config' (train.lr)``);
    None if the record matches. ``defaults`` (shaped like ``wanted``, possibly sparse) gives the
    value a key the record lacks stands for: an option added after the run was recorded.
    ``task_info`` describes the data: its floats match to 1e-5 (``_close``) and where the data
    lies (``LOCATION_KEYS``) is not compared, so a run continues on another machine or after its
    corpus moved; everything else must be equal."""

    def paths(a: Any, b: Any, default: Any, prefix: str, data: bool) -> list[str]:
        if a is _ABSENT:
            a = default
        if isinstance(a, dict) and isinstance(b, dict):
            default = default if isinstance(default, dict) else {}
            return [
                p
                for k in sorted(set(a) | set(b), key=str)
                if not (data and k in LOCATION_KEYS)
                for p in paths(a.get(k, _ABSENT), b.get(k), default.get(k), f"{prefix}{k}.", data)
            ]
        return [] if (_close(a, b) if data else a == b) else [prefix.rstrip(".")]

    for key, value in wanted.items():
        if inner := paths(
            recorded.get(key, _ABSENT), value, (defaults or {}).get(key), "", key == "task_info"
        ):
            return (
                f"{key!r} ({', '.join(inner)})"
                if inner != [""]
                else f"{key!r} (recorded {recorded.get(key)!r}, now {value!r})"
            )
    return None


def other_start(summary: Mapping[str, Any], from_checkpoint: str | None) -> str | None:
    """Why the recorded run did not start from ``from_checkpoint``'s weights, or None if it did
    (or recorded none: runs made before ``source_weights`` existed). A run built on a checkpoint
    that was trained again since must not be continued or reused as if it were built on the new one,
    nor a run that trained its own baseline as if it were built on a checkpoint."""
    stages = summary.get("stages") or []
    if from_checkpoint is None or not stages:
        return None
    if "source" not in stages[0]:
        return f"it trained its own baseline, not the model in {from_checkpoint}"
    recorded = stages[0].get("source_weights")
    # nothing to compare (a resume no longer needs the checkpoint once stage 0 is recorded)
    if recorded is None or not Path(from_checkpoint).exists():
        return None
    if recorded == weights_digest(read_start(from_checkpoint)[0]):
        return None
    return f"it started from other weights than {from_checkpoint} (was that checkpoint trained again since?)"


def recorded_mismatch(
    summary: Mapping[str, Any],
    identity: Mapping[str, Any],
    option_defaults: Mapping[str, Any],
    from_checkpoint: str | None,
) -> str | None:
    """Why the run recorded in ``summary`` is not the one ``identity`` and ``from_checkpoint``
    describe (so it may be neither continued nor reused), or None. A procedure recorded under a
    former name (``FORMER_NAMES``) is the same procedure."""
    if (recorded := summary.get("procedure")) in FORMER_NAMES:
        summary = {**summary, "procedure": current_name(recorded)}
    if difference := first_difference(summary, identity, {"config": option_defaults}):
        return f"its {difference} differs from this command's"
    return other_start(summary, from_checkpoint)
