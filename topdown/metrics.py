"""Metric names and their direction: every decision (best epoch, lr decay, early stopping,
stage acceptance, best-of-k) asks the metric which way is better, never guesses."""

from __future__ import annotations

from dataclasses import dataclass

from topdown.errors import ConfigError

LOWER_IS_BETTER = ("loss", "error", "wer", "cer", "ppl", "per", "ter")
HIGHER_IS_BETTER = ("accuracy", "acc", "top1", "top5", "f1", "bleu", "auc", "map", "precision", "recall")
RATES = ("wer", "cer", "error")  # fractions in [0, 1], shown as percentages


def base_name(name: str) -> str:
    """A metric's base: a variant (``wer_beam``, ``cer_lm``: another decoder's WER and CER) is
    known by the metric before its first underscore."""
    return name.split("_", 1)[0]


def is_rate(name: str) -> bool:
    """Is the metric (or the metric it is a variant of) a rate, shown as a percentage?"""
    return base_name(name) in RATES


def display_scale(name: str) -> tuple[int, str]:
    """How tables and plots show the metric: the factor its values are multiplied by and the unit
    put after its name (rates as percentages, everything else as computed)."""
    return (100, " (%)") if is_rate(name) else (1, "")


@dataclass(frozen=True)
class Metric:
    name: str
    lower_is_better: bool

    @classmethod
    def named(cls, name: str, lower_is_better: bool | None = None) -> Metric:
        """The metric ``name`` with its direction: as given, else known by its name or its base's."""
        if lower_is_better is None:
            if base_name(name) in LOWER_IS_BETTER or name.endswith("_loss"):
                lower_is_better = True
            elif base_name(name) in HIGHER_IS_BETTER:
                lower_is_better = False
            else:
                raise ConfigError(
                    f"metric {name!r}: its direction is unknown; say whether lower is better "
                    "(lower_is_better=...)"
                )
        return cls(name, bool(lower_is_better))

    def better(self, a: float, b: float | None) -> bool:
        """Is value ``a`` strictly better than ``b`` (``None`` = nothing yet)?"""
        return b is None or (a < b if self.lower_is_better else a > b)

    def best(self, values: list[float]) -> float:
        return min(values) if self.lower_is_better else max(values)
