"""A stage's resume point: after every epoch the loop writes its weights, the optimizer's state,
the weights of the best epochs kept so far and the loop's state (``LoopState``) to one file,
atomically; a stage that was interrupted continues from its last completed epoch.

Randomness is a pure function of ``(seed, epoch)`` (the loop reseeds every epoch), so a resume
point needs no RNG state. Resume points written by earlier versions still load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topdown.best_epochs import Ranking
from topdown.files import load_tensors, prefixed, save_tensors, unprefixed
from topdown.metrics import Metric
from topdown.task import Task


@dataclass
class LoopState:
    """Everything the loop needs to continue after its last completed epoch."""

    epoch: int = 0
    lr: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # since the last improvement (early stopping)
    plateau: int = 0  # since the last improvement or lr decay
    done: bool = False
    seconds: float = 0.0
    step: int = 0  # optimizer steps taken (drives the lr warm-up and train.schedule)
    # train.schedule other than plateau: the stage's planned steps (recomputed when a stage
    # starts or resumes)
    total_steps: int = 0


def save_resume_point(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: LoopState, kept: list, ranking: Ranking
) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}  # optimizer state: tensors to safetensors, the rest to JSON metadata
    for pid, st in sd["state"].items():
        for key, value in st.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{pid}.{key}"] = value
    save_tensors(
        path,
        {
            **prefixed("model.", model.state_dict()),
            **prefixed("optim.", tensors),
            **{k: v for i, (_, _, w) in enumerate(kept) for k, v in prefixed(f"kept{i}.", w).items()},
        },
        {
            "loop": asdict(state),
            "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
            "kept": [[val, epoch] for val, epoch, _ in kept],
            "ranked_by": ranking.names,
        },
    )


def load_resume_point(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[LoopState, list, list[str] | None]:
    """The loop state, the kept epochs and the names of the metrics they are ranked by (None: a
    resume point of an earlier version, which ranked them by ``train.monitor``, and whose kept
    epochs carry that metric's value alone, the best one its whole validation metrics)."""
    tensors, meta = load_tensors(path)
    model.load_state_dict(unprefixed("model.", tensors))
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*unprefixed("optim.", tensors).items(), *meta["optimizer"]["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    known = {f.name for f in fields(LoopState)}  # resume points of older versions may hold more
    state = LoopState(**{k: v for k, v in meta["loop"].items() if k in known})
    kept = [
        (val, epoch, unprefixed(f"kept{i}.", tensors)) for i, (val, epoch) in enumerate(meta.get("kept", []))
    ]
    if not kept and unprefixed("best.", tensors):  # still earlier versions hold the best epoch as "best."
        kept = [(state.best_val, state.best_epoch, unprefixed("best.", tensors))]
    return state, kept, meta.get("ranked_by")


def resumed_ranking(
    kept: list, ranked_by: list[str] | None, state: LoopState, task: Task, monitor: Metric
) -> tuple[Ranking, list]:
    """The ranking a resume point recorded, and its kept epochs. A resume point of an earlier
    version ranked them by ``train.monitor`` alone and holds that metric's value of each (the best
    epoch's metrics are the loop state's): its stage finishes so."""
    if ranked_by is None:
        ranked_by = [monitor.name]
        kept = [
            (
                v if isinstance(v, dict) else state.best_val if e == state.best_epoch else {monitor.name: v},
                e,
                w,
            )
            for v, e, w in kept
        ]
    known = {m.name: m for m in (monitor, task.primary)}
    return Ranking(*[known.get(name) or Metric.named(name) for name in ranked_by]), kept
