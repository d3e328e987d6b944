"""One stage of a plan: what it does (``StageSpec``, with its ``Accept`` rule), and the handle a
training loop gets for it (``Stage``): the model, the parameters to train, where to log, and
``finish``, which hands the validation metrics back to the plan."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from topdown import distributed
from topdown.config import TrainConfig
from topdown.errors import ConfigError, TopdownError
from topdown.metrics import Metric
from topdown.resets import Reinit, Reset, resets_of
from topdown.seeds import derive_seed

if TYPE_CHECKING:
    from topdown.plan import Plan


class Accept(enum.Enum):
    """When a finished stage replaces the chosen model: the cascade's one decision."""

    BETTER = "better"  # only if its validation metric is strictly better than the chosen model's
    ALWAYS = "always"  # whatever it scores (a stage that builds on the last, a subset baseline)
    NEVER = "never"  # never (a reference: the full-data baseline of transfer-classifier)

    @classmethod
    def of(cls, rule: Accept | str) -> Accept:
        """``rule`` as an ``Accept``; a name given as a string (``"always"``) is converted, a typo refused."""
        try:
            return rule if isinstance(rule, Accept) else cls(rule)
        except ValueError:
            names = ", ".join(repr(a.value) for a in cls)
            raise ConfigError(f"unknown accept rule {rule!r}; a stage's accept is one of {names}") from None

    def accepts(self, val: float, best: float | None, metric: Metric) -> bool:
        """Does a stage that scored ``val`` replace the chosen model, which scored ``best``?"""
        if self is Accept.BETTER:
            return metric.better(val, best)
        return self is Accept.ALWAYS


@dataclass(frozen=True)
class StageSpec:
    """What one stage does; a plan's ``stages()`` yields these."""

    role: str  # baseline, cascade, finetune, retrain-classifier, ... (recorded as is)
    trained: tuple[str, ...]  # the blocks it trains; the others are frozen
    start: int | None = None  # the stage whose weights it starts from; None: a freshly built model
    reinit: bool = True  # re-initialise the trained blocks when starting from a stage
    # with reinit, re-initialise these blocks instead of the trained ones: e.g. forget the upper
    # blocks while every block trains (later-layer forgetting), a neighbour of the cascade
    reinit_blocks: tuple[str, ...] | None = None
    split: int | None = None
    subset: float = 1.0  # fraction of the training data (transfer-classifier)
    candidates: int = 1  # models trained (different seeds); the best on validation is the stage's
    accept: Accept = Accept.BETTER  # a name ("always") is converted
    train: TrainConfig | None = None  # the recipe, for executors that take one (ours)
    source: str | None = None  # a checkpoint the stage loads (``--from``); it then trains nothing
    # what is done to the start weights before training (``topdown.resets``: re-initialise, shrink and
    # perturb, rescale, KELS split), in order; it replaces reinit/reinit_blocks, which are
    # ``Reinit(reinit_blocks or trained)``
    reset: Reset | Sequence[Reset] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "accept", Accept.of(self.accept))
        object.__setattr__(self, "reset", resets_of(self.reset))
        if self.reset is None:
            return
        if self.start is None or self.source is not None:
            raise ConfigError(
                f"stage {self.role!r}: a reset changes the weights of an earlier stage; give start=INDEX"
            )
        if self.reinit_blocks is not None or not self.reinit:
            raise ConfigError(
                f"stage {self.role!r}: reset= replaces reinit and reinit_blocks; give either, not both"
            )

    def resets(self) -> tuple[Reset, ...]:
        """What the stage does to its start weights, in order (nothing to a new or a loaded model)."""
        if self.start is None or self.source is not None:
            return ()
        if self.reset is not None:
            return self.reset
        blocks = self.trained if self.reinit_blocks is None else self.reinit_blocks
        return (Reinit(blocks),) if self.reinit and blocks else ()

    def reset_blocks(self) -> list[str]:
        """Every block a reset of the stage names (to check they exist before it is handed out)."""
        return [b for r in self.resets() for b in r.blocks]


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON numbers: numbers, one-element tensors and numpy scalars become floats; NaN and
    infinities, which strict JSON cannot hold, become None. Nested dicts (``val``) likewise; a tensor
    or array of several values is refused (a record holds numbers); other values unchanged."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            value = _numbers(value)
        elif hasattr(value, "item") and hasattr(value, "dtype"):  # a torch tensor, a numpy array or scalar
            size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", 1)
            if size != 1:
                raise ConfigError(
                    f"metric {key!r} is a tensor or array of {size} values; a stage records numbers "
                    "(log one value per key)"
                )
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's val or test metrics: ``_numbers``, and every number a float (as our loop gives them)."""
    return {
        k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        for k, v in _numbers(values).items()
    }


class Stage:
    """One candidate of one stage, handed to the training loop: train ``model``'s trainable
    parameters, then call ``finish`` with the validation metrics."""

    def __init__(self, plan: Plan, index: int, candidate: int, spec: StageSpec):
        self.plan, self.index, self.candidate, self.spec = plan, index, candidate, spec
        self.seed = derive_seed(plan.seed, index, candidate)
        self.record: dict[str, Any] | None = None  # the stage record, once its last candidate finished
        self.finished = False

    model = property(lambda self: self.plan.model)
    role = property(lambda self: self.spec.role)
    split = property(lambda self: self.spec.split)
    subset = property(lambda self: self.spec.subset)
    train = property(lambda self: self.spec.train or self.plan.config.train)
    trained_blocks = property(lambda self: list(self.spec.trained))
    frozen_blocks = property(lambda self: [b for b in self.plan.blocks.names if b not in self.spec.trained])
    accepted = property(lambda self: None if self.record is None else self.record["accepted"])

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters this stage trains: give these, and only these, to the optimizer."""
        return [p for _, p in self.named_trainable_parameters()]

    @property
    def resume_path(self) -> Path | None:
        """Where a loop that can resume mid-stage keeps this candidate's resume point (None: the
        plan has no run directory, nothing is written)."""
        return self.plan.record.resume_point(self.index, self.candidate)

    def describe(self) -> str:
        n = self.spec.candidates
        return f"stage {self.index} ({self.role}{'' if n == 1 else f', candidate {self.candidate + 1}/{n}'})"

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's metrics (``epoch``, ``val``, ``train_loss``, ...) to ``metrics.jsonl``.

        ``epoch`` (an int) and ``val`` (a dict of validation metrics) are required: resume and the
        report read them. Tensors are stored as numbers."""
        record = _numbers(record)
        epoch, val = record.get("epoch"), record.get("val")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not isinstance(val, Mapping):
            raise ConfigError(
                f"{self.describe()}: stage.log needs 'epoch' (an int) and 'val' (a dict of validation "
                f"metrics), got {{'epoch': {epoch!r}, 'val': {val!r}}}"
            )
        self.plan.record.log({"stage": self.index, "candidate": self.candidate, **record})

    def finish(
        self,
        val: Mapping[str, float],
        test: Mapping[str, float] | None = None,
        epochs: int = 0,
        seconds: float | None = None,
        kept_epoch: int | None = None,
        reported: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    ) -> dict[str, Any] | None:
        """Hand back the model's validation metrics (and, to report, test metrics). After the
        stage's last candidate this decides acceptance and records the stage; returns its record.
        ``kept_epoch``: the epoch whose weights the model ends with (a loop that keeps its best
        epoch's), recorded where given. ``reported``: the metrics of the plan's
        ``reported_models()``, ``{name: {"val": {...}, "test": {...}}}``, recorded beside the stage."""
        if self.finished:
            raise TopdownError(f"{self.describe()} is already finished")
        if kept_epoch is not None and (isinstance(kept_epoch, bool) or not isinstance(kept_epoch, int)):
            raise ConfigError(f"{self.describe()}: kept_epoch must be an int, got {kept_epoch!r}")
        metric = self.plan.metric.name
        self.plan.record.agree()
        reported = {
            name: {split: _metrics(m.get(split) or {}) for split in ("val", "test")}
            for name, m in (reported or {}).items()
        }
        val, test, reported = distributed.same_on_every_rank(  # rank 0's decide
            (_metrics(val), _metrics(test or {}), reported)
        )
        for split, values in (("validation", val), ("test", test)):
            # the test metrics are optional, not partial
            if (values or split == "validation") and metric not in values:
                raise ConfigError(
                    f"{self.describe()}: the {split} metrics {sorted(values)} lack the plan's "
                    f"metric {metric!r}"
                )
        # _metrics' NaN or infinity: a NaN would win no comparison, and an infinity could be chosen
        if val[metric] is None:
            raise TopdownError(
                f"{self.describe()}: validation {metric} is NaN or infinite: the stage diverged; "
                "it was not recorded (the stages before it are saved)"
            )
        if not isinstance(val[metric], float):  # _metrics made every other number a float
            raise ConfigError(f"{self.describe()}: validation {metric} must be a number, got {val[metric]!r}")
        seconds = time.perf_counter() - self._started if seconds is None else seconds
        distributed.from_rank_zero(self.model)  # the model rank 0 validated, on every rank
        self.finished = True
        self.record = self.plan._candidate_finished(self, val, test, epochs, seconds, kept_epoch, reported)
        return self.record
