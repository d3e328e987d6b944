"""Which weights end a stage: those of its best epoch on validation, or the average of its best
few epochs (``train.average_best``) where validation finds the average no worse.

Epochs are ranked by the task's metric, the one that decides acceptance, with ``train.monitor``
breaking its ties (``Ranking``): a stage is judged by the weights it keeps, so they are chosen by
what it is judged on. The loop keeps the best epochs as a list of ``(validation metrics, epoch,
weights)``, best first (``ranks_among``, ``keep_epoch``), the weights on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from topdown.console import say
from topdown.devices import host_copy
from topdown.metrics import Metric
from topdown.task import Task


@dataclass(frozen=True)
class Ranking:
    """How a stage ranks its epochs for the weights it keeps: by ``first`` (the task's metric,
    which decides acceptance), equal values by ``then`` (``train.monitor``, where it differs)."""

    first: Metric
    then: Metric | None = None

    @property
    def names(self) -> list[str]:
        return [m.name for m in (self.first, self.then) if m is not None]

    def better(self, a: Mapping[str, float], b: Mapping[str, float]) -> bool:
        """Is the epoch with validation metrics ``a`` strictly better than the one with ``b``?"""
        for metric in (self.first, self.then):
            if metric is None or a[metric.name] == b[metric.name]:
                continue
            return metric.better(a[metric.name], b[metric.name])
        return False

    def describe(self, val: Mapping[str, float]) -> str:
        return ", ".join(f"{name} {val[name]:.4g}" for name in self.names)

    @classmethod
    def of(cls, task: Task, monitor: Metric) -> Ranking:
        """A stage's ranking: the task's metric, ties broken by ``monitor`` (``train.monitor``)."""
        return cls(task.primary, monitor if monitor.name != task.primary.name else None)


def ranks_among(kept: list, val: Mapping[str, float], ranking: Ranking, n: int) -> bool:
    """Would an epoch with validation metrics ``val`` be among the ``n`` best kept so far?"""
    return len(kept) < n or ranking.better(val, kept[-1][0])


def keep_epoch(
    kept: list, val: dict[str, float], epoch: int, model: nn.Module, ranking: Ranking, n: int
) -> None:
    """Insert ``(val, epoch, a host copy of model's weights)`` into ``kept``, ordered best first, at
    most ``n`` long (an equal epoch ranks after the earlier one), for an epoch that ``ranks_among``
    them. The epoch it displaces is dropped before the copy is made: ``n`` copies at most, ever."""
    del kept[n - 1 :]
    at = next((i for i, (v, _, _) in enumerate(kept) if ranking.better(val, v)), len(kept))
    kept.insert(at, (val, epoch, host_copy(model)))


def average_weights(
    states: list[dict[str, torch.Tensor]], device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts (accumulated in float32), each tensor computed on
    ``device`` (default: where the states are) and returned where the states are. The loop keeps
    its epochs' weights on the host and averages them on the model's device: the device's
    arithmetic, as before they were kept on the host (a GPU divides by a count as a multiplication
    by its reciprocal, the CPU divides). A tensor that is the same in every state (a frozen
    block's) is kept exactly: a float mean of equal values can move it by a rounding step, and a
    frozen block must not change. Integer buffers, such as BatchNorm's batch counter, are the
    first state's."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point() and not all(torch.equal(s[name], first) for s in states[1:]):
            mean = sum(s[name].to(device).float() for s in states) / len(states)
            out[name] = mean.to(first.dtype).to(first.device)
        else:
            out[name] = first.clone()
    return out


def average_if_no_worse(
    model: nn.Module, ranking: Ranking, kept: list, validate: Callable[[], dict[str, float]], desc: str
) -> tuple[dict[str, float], int | None]:
    """Load the average of the kept epochs' weights if validation (``validate``, of the model as
    loaded) finds it no worse than the best epoch, ``kept[0]`` (then return its metrics, and no
    epoch); otherwise leave the best epoch's weights (and return its metrics and epoch)."""
    best_val, best_epoch, best_weights = kept[0]
    model.load_state_dict(average_weights([w for _, _, w in kept], next(model.parameters()).device))
    val = validate()
    epochs = ", ".join(str(e) for _, e, _ in sorted(kept, key=lambda k: k[1]))
    if ranking.better(best_val, val):
        model.load_state_dict(best_weights)
        say(
            f"{desc}: the average of epochs {epochs} (val {ranking.describe(val)}) is worse than the "
            f"best epoch's ({ranking.describe(best_val)}); kept the best epoch"
        )
        return best_val, best_epoch
    say(
        f"{desc}: averaged the weights of epochs {epochs}: val {ranking.describe(val)} "
        f"(best epoch {ranking.describe(best_val)})"
    )
    return val, None
