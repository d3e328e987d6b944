"""Stage 0 taken from another run: the arms of a comparison start from its baseline's model.

Every arm of a comparison begins with the same stage 0 as the run that holds its baseline: the whole
model of the same task, data, seed and recipe trained from a fresh initialisation. Randomness is a
function of the seed (``resume_point``), so on the same machine and threads the arm would train that
model again bit for bit. A plan given that run (``Plan(baseline_from=...)``; ``compare`` and
``sweep`` give every arm its seed's baseline run) takes its finished stage 0 instead: weights, record
and epoch metrics. That is the longest stage of a re-initialisation schedule (it alone trains from
scratch; later stages mostly stop early), and the arms are then paired on one baseline model wherever
each of them ran. The stage's record names the run it came from (``adopted_from``).

Only a stage 0 that is that same training is adopted: same task, data, seed, metric and
configuration (apart from the sections no stage 0 reads: ``procedure``, ``cascade``), one candidate
on all of the data, a plan that reports no derived models, a run of one process. Anything else, or
a run whose stage 0 has not finished yet, and the plan trains its own stage 0, as it would without.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from topdown.errors import TopdownError
from topdown.identity import first_difference
from topdown.runs import RunDir, stage_checkpoint

# the configuration sections no stage 0 reads: the plans' own options
NOT_READ_BY_STAGE_ZERO = ("procedure", "cascade")


@dataclass(frozen=True)
class AdoptedStage:
    """A finished stage 0 of another run: what its one candidate recorded, its weights, its epochs'
    metrics lines, and where it came from (relative to the adopting run's directory)."""

    tried: dict[str, Any]
    test: dict[str, float]
    seconds: float
    weights: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    adopted_from: str


def _comparable(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A run's identity without what no stage 0 depends on (its procedure, its plans' options)."""
    config = {k: v for k, v in identity.get("config", {}).items() if k not in NOT_READ_BY_STAGE_ZERO}
    return {**{k: v for k, v in identity.items() if k != "procedure"}, "config": config}


def adoptable_stage_zero(
    source: str | Path,
    run: Path | None,
    identity: Mapping[str, Any],
    option_defaults: Mapping[str, Any],
    all_blocks: tuple[str, ...],
) -> AdoptedStage | None:
    """The stage 0 of the run in ``source`` if it is the one this run (``run``, its directory; None:
    in memory), whose stage 0 trains the whole model (``all_blocks``) from a fresh start as one
    candidate on all of the data, would train: the same, and ``identity`` (``run_identity``) alike
    but for the procedure and the sections no stage 0 reads. None where it is not, or is not
    finished yet."""
    source = Path(source)
    if run is not None and source.resolve() == run.resolve():
        return None
    donor = RunDir(source, writer=False)
    summary = donor.read_summary() if source.is_dir() else None
    stages = (summary or {}).get("stages") or []
    if not stages:
        return None
    first = stages[0]
    if (
        "source" in first
        or len(first.get("candidates") or []) != 1
        or first.get("trained_blocks") != list(all_blocks)
        or first.get("subset", 1.0) != 1.0
        or first_difference(_comparable(summary), _comparable(identity), {"config": option_defaults})
    ):
        return None
    try:
        weights, _ = RunDir.load_checkpoint(donor.checkpoint(stage_checkpoint(0)))
    except (OSError, TopdownError):
        return None  # pruned or damaged: this run trains its own
    tried = dict(first["candidates"][0])
    if "kept_epoch" in first:
        tried["kept_epoch"] = first["kept_epoch"]
    metrics = [line for line in donor.read_metrics() if line.get("stage") == 0]
    where = os.path.relpath(source, run) if run is not None else str(source)
    return AdoptedStage(tried, dict(first["test"]), float(first["seconds"]), weights, metrics, where)
