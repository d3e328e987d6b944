"""What the method needs from a task: a handful of plain callables, nothing speech- or text-specific;
and the small pieces the built-in tasks share to build theirs (where a corpus lies, reading its text
files, index batches over a fixed subset)."""

from __future__ import annotations

import gzip
import inspect
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topdown.blocks import BlockSpec
from topdown.errors import ConfigError, DataError
from topdown.metrics import Metric

DATA_DIR = "data_dir"  # the ``info`` key saying where a corpus lies (``data_location``)


def data_location(data_dir: str | Path) -> dict[str, str]:
    """The ``info`` entry for where a ``--data-dir`` corpus lies: recorded for the reader, never
    compared when runs are matched (``runs.LOCATION_KEYS``), so a corpus may move or a run continue
    on another machine; the rest of ``info`` says what the corpus is."""
    return {DATA_DIR: str(Path(data_dir).resolve())}


def text_lines(path: Path, missing: str = "file not found") -> list[str]:
    """The lines of a corpus's UTF-8 text file (gzip-compressed if its name ends in ``.gz``), a
    leading byte order mark (Windows editors write one) dropped rather than read as part of the
    first word. A missing, unreadable or non-UTF-8 file is a ``DataError`` naming it."""
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, zlib.error) as e:  # a truncated or damaged .gz among them
        raise DataError(f"{path}: cannot read it ({e})") from None


def subset_size(size: int, subset: float, least: int = 1) -> int:
    """How many examples the fixed training ``subset`` holds: the first ``subset`` of ``size``, at
    least ``least``. Fixed, not drawn, so a transfer and the subset baseline it is compared with
    train on the same examples whatever their seeds."""
    return max(least, round(size * subset))


def index_batches(
    size: int, subset: float, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """One epoch of index batches for ``train_batches``: the first ``subset`` of ``size`` examples
    (held in a fixed order, so the same subset whatever the seed), shuffled with ``generator``; a last
    batch of one example is dropped (BatchNorm needs two)."""
    n = subset_size(size, subset)
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        if len(idx := order[i : i + batch_size]) > 1:
            yield idx


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``Task.loss`` of a classifier whose batches are (inputs, class indices): digits and image."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


TASK_CALLABLES = {
    "build_model": (),
    "train_batches": ("generator", "subset"),
    "loss": ("model", "batch"),
    "evaluate": ("model", "split"),
}


@dataclass
class Task:
    """A model family plus its data, as our training loop (``fit``) sees it. A user with their
    own loop needs none of this: they drive a plan (``topdown.Cascade``, ...) directly.

    - ``build_model()`` returns a freshly initialised model; the procedures seed the
      global RNG before calling it, so it must draw its initial values from ``torch``'s RNG.
      Re-initialising a block copies that block from a newly built model.
    - ``blocks``: the ordered block spec (see ``Blocks``), input to output.
    - ``train_batches(generator, subset)`` yields one epoch of training batches, shuffled
      with ``generator``; ``subset`` in (0, 1] selects a fixed fraction of the training
      set (the same one whatever the seed).
    - ``loss(model, batch)`` returns the scalar training loss of one batch.
    - ``evaluate(model, split)`` returns metrics for ``"val"`` or ``"test"``; it must
      contain ``metric``.
    - ``metric``: the primary validation metric (stage acceptance); its direction is
      ``lower_is_better``, or known from its name (``Metric.named``).
    - ``info``: JSON-serialisable facts the trained model depends on (a vocabulary,
      feature statistics); recorded in ``summary.json`` as ``task_info`` and in every
      checkpoint's metadata, so a model can be used without the training data; where the
      data lies goes under ``data_location``'s key, which matching runs ignores.
    """

    name: str
    build_model: Callable[[], nn.Module]
    blocks: BlockSpec
    train_batches: Callable[[torch.Generator, float], Iterable[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module, str], Mapping[str, float]]
    metric: str = "loss"
    lower_is_better: bool | None = None
    shared: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A task's callables are checked where it is built, not as a traceback epochs later."""
        for name, arguments in TASK_CALLABLES.items():
            fn = getattr(self, name)
            if not callable(fn) or (name == "build_model" and isinstance(fn, nn.Module)):
                raise ConfigError(f"task {self.name}: {name} must be a function, got {type(fn).__name__}")
            try:
                inspect.signature(fn).bind(*arguments)
            except TypeError:
                raise ConfigError(
                    f"task {self.name}: {name} must take {len(arguments)} positional argument(s), "
                    f"as {name}({', '.join(arguments)}); it is {name}{inspect.signature(fn)}"
                ) from None
            except ValueError:
                pass  # a builtin without a readable signature: trusted

    @property
    def primary(self) -> Metric:
        return Metric.named(self.metric, self.lower_is_better)
