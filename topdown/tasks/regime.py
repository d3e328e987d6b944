"""The training regime every built-in task's ``data`` section declares alike, so that a sweep varies
it the same way on every task: ``data.fraction`` (a subset of the training set), ``data.label_noise``
(symmetric noise on the training labels), ``data.augment`` (the task's augmentation on or off) and
``data.seed`` (what the first two draw from).

- The subset is stratified as the task's data allows: by class for classification (each class keeps
  ``max(1, round(fraction * n))`` of its ``n`` examples), by whole speakers for speech (speakers drawn
  in a seeded order until they hold the fraction of the utterances), a contiguous span of the token
  stream for language modelling.
- Label noise: each training label, with probability ``label_noise``, is replaced by one of the *other*
  classes, drawn uniformly (never by its own), so ``label_noise`` is the expected share of wrong labels.
- Validation and test are never touched, nor is anything a task computes from the whole training
  split to define its inputs (feature normalisation, image statistics, vocabularies): a sweep compares
  models on the same evaluation data at every fraction and noise rate.

Both draws depend on ``data.seed`` (default 0) alone, never on the run's seed: every arm and every
seed of a comparison trains on the same examples with the same labels, so a paired difference is
the method's, and the run's seed still varies only what it varied before (initialisation, batch
order, dropout; the batch order over fewer examples is what a smaller set implies). Other subsets are
other values of ``data.seed``. At one ``data.seed`` the draws are nested: a smaller fraction's subset
lies inside a larger one's, and the labels wrong at a lower noise rate are wrong, with the same
class, at a higher one; the subset is drawn by the true labels, so it is the same at every noise rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from topdown.errors import ConfigError, DataError
from topdown.sections import Section, option
from topdown.seeds import derive_seed

# the draws' streams, derive_seed(data.seed, _DATA, stream): apart from a run's (seed, ...) streams
_DATA, _SUBSET, _NOISE = 7919, 1, 2


@dataclass(frozen=True)
class Regime(Section):
    """The regime options, first in each task's ``data`` section. A task whose training targets are
    not class labels names them in ``TARGETS`` (``data.label_noise`` is then refused); a task with
    augmentation says so (``AUGMENTS``) and declares ``augment`` true by default. Where an
    option does not apply, only its neutral value is accepted: a sweep arm that would train the same
    model as another is an error, not a silent copy."""

    SECTION: ClassVar[str] = "data"
    TARGETS: ClassVar[str] = ""  # "" = class labels
    AUGMENTS: ClassVar[bool] = False

    fraction: float = option(1.0, gt=0, le=1)  # of the training set, drawn with data.seed
    seed: int = option(0, ge=0)  # the training subset's and the label noise's draws (not the run's seed)
    label_noise: float = option(0.0, ge=0, lt=1)  # classification: share of training labels made wrong
    augment: bool = False  # the task's training augmentation (false: none, whatever its own options say)

    def check_relations(self) -> None:
        if self.label_noise and self.TARGETS:
            raise ConfigError(
                f"data.label_noise is {self.label_noise:g}, but this task trains on {self.TARGETS}, not "
                "class labels: label noise is for the classification tasks (digits, image)"
            )
        if self.augment and not self.AUGMENTS:
            raise ConfigError(
                "data.augment is true, but this task has no augmentation to switch on: false is its only "
                "value"
            )

    def changes_training_set(self) -> bool:
        return self.fraction < 1 or self.label_noise > 0


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, _DATA, stream))


def class_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (ascending) of a stratified subset: of each class's ``n`` examples the first
    ``max(1, round(fraction * n))`` in one seeded order of the whole set (so a smaller fraction's
    subset lies inside a larger one's)."""
    labels = np.asarray(labels)
    order = _rng(seed, _SUBSET).permutation(len(labels))
    kept = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        kept.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(kept))


def group_subset(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Indices (ascending) of whole groups (speakers): groups in a seeded order, as many as bring the
    count of examples nearest to ``fraction`` of them (at least one group; ties: the fewer groups).
    A longer prefix of the same order for a larger fraction, so subsets are nested."""
    sizes = Counter(groups)
    names = sorted(sizes)
    order = [names[i] for i in _rng(seed, _SUBSET).permutation(len(names))]
    held = np.cumsum([sizes[g] for g in order])
    chosen = set(order[: 1 + int(np.argmin(np.abs(held - fraction * len(groups))))])
    return np.array([i for i, g in enumerate(groups) if g in chosen], dtype=np.int64)


def span(length: int, fraction: float, seed: int) -> slice:
    """A contiguous ``round(fraction * length)`` of a stream (at least one), centred on a seeded
    point and shifted to fit inside it; a larger fraction's span (same seed) contains a smaller one's."""
    n = max(1, round(fraction * length))
    centre = int(_rng(seed, _SUBSET).integers(length))
    start = min(max(centre - n // 2, 0), length - n)
    return slice(start, start + n)


def noisy_labels(labels: torch.Tensor, classes: int, p: float, seed: int) -> torch.Tensor:
    """``labels`` with each, with probability ``p``, replaced by one of the other ``classes - 1``
    classes drawn uniformly. Every label's draws are made whatever ``p``, so the labels wrong at a
    lower ``p`` are wrong, with the same class, at a higher one."""
    if classes < 2:
        raise DataError(f"data.label_noise needs two classes or more; the training set has {classes}")
    rng = _rng(seed, _NOISE)
    flip = torch.from_numpy(rng.random(len(labels)) < p)
    shift = torch.from_numpy(rng.integers(1, classes, len(labels)))
    return torch.where(flip, (labels + shift) % classes, labels)


def classification_set(
    x: torch.Tensor, y: torch.Tensor, classes: int, data: Regime
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A classification task's training examples under ``data``'s regime: labels made noisy, then
    the stratified subset (drawn by the true labels); with the facts for the task's ``info``
    (nothing in the default regime, which returns ``x`` and ``y`` as they are)."""
    if not data.changes_training_set():
        return x, y, {}
    noisy = noisy_labels(y, classes, data.label_noise, data.seed)
    keep = torch.from_numpy(class_subset(y.numpy(), data.fraction, data.seed))
    facts = {"examples": len(keep), "of": len(y), "wrong_labels": int((noisy[keep] != y[keep]).sum())}
    return x[keep], noisy[keep], facts
