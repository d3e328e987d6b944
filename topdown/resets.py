"""What a stage does to the weights it starts from before it trains: its resets.

A stage that starts from an earlier stage's model (``StageSpec.start``) may change some blocks
first: re-initialise them (the cascade, later-layer forgetting), shrink them towards a fresh
model (shrink and perturb), rescale them to their initial norms (layerwise re-initialisation),
or re-draw part of each weight tensor (Knowledge Evolution's split). Each is a ``Reset``: given
a ``ResetContext`` (the model holding the start weights, its blocks, a model freshly built with
the stage's seed, and the model as first initialised), it changes the model in place and says
what it did for the run record (``describe``). Anything re-drawn is copied from the fresh model,
so the model's own initialisation scheme is kept, whatever it is. docs/schedules.md has the
sources each one follows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from topdown.blocks import Blocks
from topdown.errors import ConfigError


@dataclass
class ResetContext:
    """What a reset may read: ``model`` (holding the stage's start weights, changed in place),
    ``blocks`` over it, ``fresh`` (built with the stage's seed) and ``initial`` (the model as stage
    0 first built it; None unless a reset of the stage ``needs_initial``)."""

    model: nn.Module
    blocks: Blocks
    fresh: nn.Module
    initial: nn.Module | None = None

    def parameters_of(self, blocks: Sequence[str]) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters ``blocks`` own, by canonical name (a tied weight once, in its owner)."""
        keys = set(self.blocks.state_keys(blocks))
        for name, p in self.model.named_parameters():
            if name in keys:
                yield name, p

    def buffers_of(self, blocks: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The buffers (BatchNorm statistics, ...) held by ``blocks``' modules."""
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        state = self.model.state_dict(keep_vars=True)
        for key in self.blocks.state_keys(blocks):
            if key not in params:
                yield key, state[key]


@runtime_checkable
class Reset(Protocol):
    """One change to the start weights of a stage (see the module docstring)."""

    kind: ClassVar[str]  # the record's name for it
    blocks: tuple[str, ...]
    needs_initial: ClassVar[bool]  # reads ``ResetContext.initial``

    def apply(self, context: ResetContext) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def _blocks(blocks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(blocks, str) or not blocks:
        raise ConfigError(f"a reset names its blocks as a non-empty sequence of names, got {blocks!r}")
    return tuple(blocks)


@dataclass(frozen=True)
class Reinit:
    """Re-initialise ``blocks`` (parameters and buffers) by copying them from the fresh model."""

    blocks: tuple[str, ...]
    kind: ClassVar[str] = "reinit"
    needs_initial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", _blocks(self.blocks))

    def apply(self, context: ResetContext) -> None:
        context.blocks.copy_blocks(context.fresh, self.blocks)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "blocks": list(self.blocks)}


@dataclass(frozen=True)
class ShrinkPerturb:
    """θ ← shrink·θ + perturb·θ_fresh for every parameter of ``blocks``; their buffers restart
    from the fresh model's (Ash & Adams return the fresh network, so its statistics are kept)."""

    blocks: tuple[str, ...]
    shrink: float = 0.4
    perturb: float = 0.1
    kind: ClassVar[str] = "shrink-perturb"
    needs_initial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", _blocks(self.blocks))
        for name in ("shrink", "perturb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"shrink-perturb's {name} must be a number >= 0, got {value!r}")

    def apply(self, context: ResetContext) -> None:
        fresh = context.fresh.state_dict()
        with torch.no_grad():
            for name, p in context.parameters_of(self.blocks):
                p.copy_(
                    self.shrink * p + self.perturb * fresh[name].to(p)
                )  # the fresh model may be on the CPU
            for key, buffer in context.buffers_of(self.blocks):
                buffer.copy_(fresh[key])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "blocks": list(self.blocks),
            "shrink": self.shrink,
            "perturb": self.perturb,
        }


@dataclass(frozen=True)
class RescaleToInit:
    """Rescale every parameter tensor of ``blocks`` to its Frobenius norm in the model as first
    initialised (layerwise re-initialisation); buffers are kept. A tensor whose norm is 0 now
    cannot be rescaled and stays 0; one initialised to 0 (a bias) becomes 0."""

    blocks: tuple[str, ...]
    kind: ClassVar[str] = "rescale"
    needs_initial: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", _blocks(self.blocks))

    def apply(self, context: ResetContext) -> None:
        initial = context.initial.state_dict()
        with torch.no_grad():
            for name, p in context.parameters_of(self.blocks):
                if p.is_floating_point() and (norm := p.norm()) > 0:
                    p.mul_(initial[name].to(p).norm() / norm)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "blocks": list(self.blocks), "norm": "initial"}


def kels_fit(shape: Sequence[int], split_rate: float, first: bool, last: bool) -> tuple[slice, ...]:
    """The fit part of a weight tensor of ``shape`` (outputs, inputs, kernel...) under Knowledge
    Evolution's KELS split: the first ⌈s·inputs⌉ inputs of the first ⌈s·outputs⌉ outputs, whole
    kernels. The model's first layer keeps all its inputs, its last layer all its outputs."""
    out, inp = shape[0], shape[1]
    rows = out if last else math.ceil(split_rate * out)
    cols = inp if first else math.ceil(split_rate * inp)
    return (slice(0, rows), slice(0, cols))


@dataclass(frozen=True)
class KelsSplit:
    """Knowledge Evolution's generation step over ``blocks``: every weight tensor of two or more
    dimensions keeps its fit part (``kels_fit``) and takes its reset part from the fresh model;
    tensors of one dimension (biases, normalisation weights) and buffers are kept whole."""

    blocks: tuple[str, ...]
    split_rate: float = 0.5
    kind: ClassVar[str] = "kels"
    needs_initial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", _blocks(self.blocks))
        rate = self.split_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
            raise ConfigError(f"the KELS split rate must be a number in (0, 1), got {rate!r}")

    @staticmethod
    def weight_tensors(model: nn.Module) -> list[str]:
        """The model's parameters of two or more dimensions, in order: the tensors KELS splits."""
        return [n for n, p in model.named_parameters() if p.dim() >= 2]

    def fit_parts(self, model: nn.Module, blocks: Blocks) -> dict[str, tuple[slice, ...]]:
        """Each split tensor of ``blocks`` -> the index of its fit part."""
        weights = self.weight_tensors(model)
        keys = set(blocks.state_keys(self.blocks))
        params = dict(model.named_parameters())
        return {
            name: kels_fit(params[name].shape, self.split_rate, name == weights[0], name == weights[-1])
            for name in weights
            if name in keys
        }

    def apply(self, context: ResetContext) -> None:
        fresh, params = context.fresh.state_dict(), dict(context.model.named_parameters())
        with torch.no_grad():
            for name, fit in self.fit_parts(context.model, context.blocks).items():
                p = params[name]
                kept = p[fit].clone()
                p.copy_(fresh[name])
                p[fit] = kept

    def slim(self, model: nn.Module, blocks: Blocks) -> nn.Module:
        """Knowledge Evolution's slim model: a copy of ``model`` with every split tensor's reset part
        zeroed. Where layers are joined only by per-channel operations (normalisation per channel,
        activations, residual additions, pooling), no reset weight then reaches a fit output, so the
        copy computes exactly what the fit part alone computes in a network of width ⌈s·C⌉ (the
        narrow network the source builds); where a layer mixes channels otherwise (LayerNorm,
        attention, recurrent gates, a flatten before a linear layer) it is that masked network."""
        slim = copy.deepcopy(model)
        params = dict(slim.named_parameters())
        with torch.no_grad():
            for name, fit in self.fit_parts(slim, blocks).items():
                kept = params[name][fit].clone()
                params[name].zero_()
                params[name][fit] = kept
        return slim

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "blocks": list(self.blocks), "split_rate": self.split_rate}


BUILT_IN = (Reinit, ShrinkPerturb, RescaleToInit, KelsSplit)


def resets_of(value: Reset | Sequence[Reset] | None) -> tuple[Reset, ...] | None:
    """A stage's ``reset`` as a tuple of resets (one given alone is wrapped); anything else refused."""
    if value is None:
        return None
    resets = (value,) if isinstance(value, Reset) else tuple(value)
    for r in resets:
        if not isinstance(r, Reset):
            raise ConfigError(
                "a stage's reset is a Reset (topdown.resets: "
                f"{', '.join(r.__name__ for r in BUILT_IN)}) or a sequence of them, "
                f"got {type(r).__name__}"
            )
    return resets


def in_words(entry: dict[str, Any]) -> str:
    """A recorded reset (``Reset.describe()``) in words, for the report's stage table."""
    blocks, kind = ", ".join(entry["blocks"]), entry["kind"]
    if kind == "reinit":
        return f"re-initialised: {blocks}"
    if kind == "shrink-perturb":
        return f"shrunk ×{entry['shrink']:g} + fresh ×{entry['perturb']:g}: {blocks}"
    if kind == "rescale":
        return f"rescaled to initial norms: {blocks}"
    if kind == "kels":
        return f"KELS reset part re-drawn (split rate {entry['split_rate']:g}): {blocks}"
    return f"{kind}: {blocks}"
