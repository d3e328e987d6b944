"""``digits``: 8x8 handwritten digits (the bundled copy of scikit-learn's set), a small MLP.

The fast task: a stage trains in a second, so it carries the tests and the many-seed
statistics. Each hidden layer (Linear, BatchNorm, ReLU, dropout) is one block and the
output layer is the last, so the frozen-BatchNorm invariants are exercised by a real task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from topdown.errors import ConfigError, DataError
from topdown.sections import Section, TaskSections, option
from topdown.task import Task, cross_entropy_loss, index_batches
from topdown.tasks.regime import Regime, classification_set

DATA = Path(__file__).resolve().parents[1] / "data" / "digits" / "digits.npz"


@dataclass(frozen=True)
class Data(Regime):
    """The regime options (``topdown.tasks.regime``; no augmentation), then the split and batches."""

    val_fraction: float = option(0.2, gt=0, lt=1)  # of the 1797 images, a fixed split whatever the seed
    test_fraction: float = option(0.2, gt=0, lt=1)
    batch_size: int = option(64, ge=2)  # BatchNorm needs two examples

    def check_relations(self) -> None:
        super().check_relations()
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction must be below 1 (got {self.val_fraction} + "
                f"{self.test_fraction})"
            )


@dataclass(frozen=True)
class Model(Section):
    SECTION: ClassVar[str] = "model"
    hidden: int = option(64, ge=1)
    layers: int = option(3, ge=1)
    dropout: float = option(0.1, ge=0, lt=1)


SECTIONS = {"data": Data, "model": Model}
DEFAULTS: dict[str, Any] = {
    "train": {"epochs": 30, "lr": 0.003, "lr_patience": 2, "early_stop": 6},
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": {"hidden": 32}, "train": {"epochs": 3}},
    "demo": {},
    "bench": {"model": {"hidden": 128, "dropout": 0.2}, "train": {"epochs": 60, "early_stop": 8}},
}


class MLP(nn.Module):
    def __init__(self, hidden: int, layers: int, dropout: float):
        super().__init__()
        sizes = [64] + [hidden] * layers
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), nn.Dropout(dropout))
            for a, b in zip(sizes, sizes[1:])
        )
        self.output = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = layer(x)
        return self.output(x)


def block_names(model_cfg: Model) -> list[tuple[str, list[str]]]:
    return [(f"layer{i + 1}", [f"hidden.{i}"]) for i in range(model_cfg.layers)] + [("output", ["output"])]


def build_model(cfg: TaskSections) -> nn.Module:
    m = cfg.model
    return MLP(m.hidden, m.layers, m.dropout)


def load_splits(data_cfg: Data, path: Path = DATA) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed train/val/test split (independent of the run's seed), pixels scaled to [0, 1]."""
    if not path.is_file():
        raise DataError(f"digits data file {path} is missing")
    with np.load(path, allow_pickle=False) as z:
        x, y = z["images"].astype(np.float32) / 16.0, z["labels"].astype(np.int64)
    order = np.random.default_rng(12345).permutation(len(y))
    n_test, n_val = int(len(y) * data_cfg.test_fraction), int(len(y) * data_cfg.val_fraction)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if any(len(idx) == 0 for idx in parts.values()):
        raise DataError(
            f"digits: fractions {data_cfg.val_fraction}/{data_cfg.test_fraction} leave an empty split"
        )
    return {k: (torch.from_numpy(x[idx]), torch.from_numpy(y[idx])) for k, idx in parts.items()}


def make(cfg: TaskSections, data_dir: str | None = None) -> Task:
    if data_dir is not None:
        raise DataError("digits uses its bundled data; --data-dir is not supported")
    splits = load_splits(cfg.data)
    x_train, y_train, regime = classification_set(*splits["train"], 10, cfg.data)
    batch_size = cfg.data.batch_size

    def train_batches(generator: torch.Generator, subset: float):
        for idx in index_batches(len(y_train), subset, batch_size, generator):
            yield x_train[idx], y_train[idx]

    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        x, y = splits[split]
        device = next(model.parameters()).device
        logits = model(x.to(device)).cpu()
        return {
            "error": (logits.argmax(1) != y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item(),
        }

    return Task(
        name="digits",
        build_model=lambda: build_model(cfg),
        blocks=block_names(cfg.model),
        train_batches=train_batches,
        loss=cross_entropy_loss,
        evaluate=evaluate,
        metric="error",
        lower_is_better=True,
        info={"regime": regime} if regime else {},
    )
