"""Each built-in procedure as one call on a ``Task``: ``topdown.cascade(task, out)`` and its kin
run ``procedures.run_procedure`` with the options of that procedure as arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from topdown.config import CascadeConfig, ProcedureConfig, RunConfig, TrainConfig
from topdown.procedures import run_procedure
from topdown.task import Task


def _config(
    train: TrainConfig | None, cascade: CascadeConfig | None = None, procedure: ProcedureConfig | None = None
) -> RunConfig:
    return RunConfig(
        train=train or TrainConfig(),
        cascade=cascade or CascadeConfig(),
        procedure=procedure or ProcedureConfig(),
    )


def baseline(task: Task, out: str | Path, *, train: TrainConfig | None = None, **kw) -> dict[str, Any]:
    """Train all blocks jointly (stage 0 only)."""
    return run_procedure("baseline", task, out, config=_config(train), **kw)


def cascade(
    task: Task,
    out: str | Path,
    *,
    train: TrainConfig | None = None,
    cascade: CascadeConfig | None = None,
    **kw,
) -> dict[str, Any]:
    """Top-down cascade: stage 0 (or ``from_checkpoint``), then a stage per split, accepted on validation."""
    return run_procedure("cascade", task, out, config=_config(train, cascade), **kw)


def retrain_classifier(
    task: Task, out: str | Path, split: int, *, train: TrainConfig | None = None, **kw
) -> dict[str, Any]:
    """From the baseline, freeze blocks 1..split and train fresh blocks above them."""
    return run_procedure(
        "retrain-classifier", task, out, config=_config(train, procedure=ProcedureConfig(split=split)), **kw
    )


def forgetting(
    task: Task,
    out: str | Path,
    split: int | None = None,
    rounds: int | None = None,
    *,
    train: TrainConfig | None = None,
    cascade: CascadeConfig | None = None,
    **kw,
) -> dict[str, Any]:
    """Later-layer forgetting, the cascade's neighbour: rounds of re-initialising the blocks above
    ``split`` and training every block (defaults: the cascade's first split, its number of stages)."""
    return run_procedure(
        "forgetting",
        task,
        out,
        config=_config(train, cascade, ProcedureConfig(split=split, rounds=rounds)),
        **kw,
    )


forget = forgetting  # its former name


def transfer_classifier(
    task: Task, out: str | Path, split: int, subset: float, *, train: TrainConfig | None = None, **kw
) -> dict[str, Any]:
    """A full-data model's classifier over a feature extractor trained on a subset, vs a subset baseline."""
    config = _config(train, procedure=ProcedureConfig(split=split, subset=subset))
    return run_procedure("transfer-classifier", task, out, config=config, **kw)
