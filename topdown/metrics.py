"""Metric names and their direction: every decision (best epoch, lr decay, early stopping,
stage acceptance, best-of-k) asks the metric which way is better, never guesses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

LOWER_IS_BETTER = ("loss", "error", "wer", "cer", "wer_beam", "cer_beam", "wer_lm", "cer_lm", "ppl", "per", "ter")
HIGHER_IS_BETTER = ("accuracy", "acc", "top1", "top5", "f1", "bleu", "auc", "map", "precision", "recall")
PERCENT_METRICS = ("wer", "cer", "error", "wer_beam", "cer_beam", "wer_lm", "cer_lm")  # fractions in [0, 1], shown as percentages


@dataclass(frozen=True)
class Metric:
    name: str
    lower_is_better: bool

    @classmethod
    def named(cls, name: str, lower_is_better: bool | None = None, declared: Mapping[str, bool] | None = None) -> "Metric":
        """The metric ``name`` with its direction: as given, else declared, else known by name."""
        if lower_is_better is None and declared and name in declared:
            lower_is_better = declared[name]
        if lower_is_better is None:
            if name in LOWER_IS_BETTER or name.endswith("_loss"):
                lower_is_better = True
            elif name in HIGHER_IS_BETTER:
                lower_is_better = False
            else:
                raise ConfigError(f"metric {name!r}: its direction is unknown; say whether lower is better (lower_is_better=...)")
        return cls(name, bool(lower_is_better))

    def better(self, a: float, b: float | None) -> bool:
        """Is value ``a`` strictly better than ``b`` (``None`` = nothing yet)?"""
        return b is None or (a < b if self.lower_is_better else a > b)

    def best(self, values: list[float]) -> float:
        return min(values) if self.lower_is_better else max(values)
