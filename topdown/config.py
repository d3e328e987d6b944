"""Configuration: the method's options as dataclasses, and ``--set key=value`` over nested dicts.

A run's resolved configuration is one nested dict: the task's ``data`` and ``model``
sections plus ``train`` (one stage's recipe), ``cascade`` (the cascade's options) and
``procedure`` (split and subset). Only keys that already exist can be set, so a typo is
an error rather than a silently ignored option.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class TrainConfig:
    """One stage's training recipe. The learning rate decays on validation plateaus and
    training stops early, so every stage (and the baseline) ends at a low learning rate."""
    SECTION: typing.ClassVar[str] = "train"

    epochs: int = 10  # at most this many epochs
    optimizer: str = "adam"  # adam | adamw | sgd | ntasgd (sgd, then averaged sgd once validation stops improving)
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    clip: float = 5.0  # gradient-norm clipping; 0 turns it off
    lr_decay: float = 0.5  # multiply the lr by this after `lr_patience` epochs without improvement
    lr_patience: int = 1
    min_lr: float = 0.0  # stop once the lr falls below this
    early_stop: int = 0  # stop after this many epochs without improvement; 0 = never
    restore_best: bool = True  # end the stage with its best-on-validation epoch's weights
    monitor: str = ""  # validation metric for the best epoch, lr decay and early stopping; "" = the task's metric
    nonmono: int = 5  # ntasgd: start averaging once validation is worse than the best of all epochs but the last `nonmono`
    amp: str = ""  # "bf16": mixed precision (autocast) for the training forward pass; "" = full precision
    warmup_steps: int = 0  # > 0: the lr ramps linearly from lr/warmup_steps to lr over this many batches (per stage)


@dataclass
class CascadeConfig:
    """Options of the top-down cascade. Defaults are ours, not the paper's: its abstract
    gives none of them. See docs/method.md."""
    SECTION: typing.ClassVar[str] = "cascade"

    splits: list[int] | None = None  # descending splits; default L-1, L-2, ..., 1
    epochs: int | None = None  # per stage; default train.epochs
    lr: float | None = None  # per stage; default train.lr
    reinit: bool = True  # False: warm-start the feature extractor (ablation)
    candidates: int = 1  # models per stage (different seeds); the best on validation competes
    patience: int | None = None  # stop after this many rejected stages in a row
    finetune_epochs: int = 0  # > 0: a final stage training all blocks jointly (ablation)
    finetune_lr: float | None = None  # default 0.1 * the stage lr
    frozen_dropout: bool = False  # keep dropout active inside frozen blocks


@dataclass
class ProcedureConfig:
    SECTION: typing.ClassVar[str] = "procedure"
    split: int | None = None  # retrain-classifier and transfer-classifier
    subset: float | None = None  # transfer-classifier: fraction of the training data


def method_defaults() -> dict[str, Any]:
    return {"train": asdict(TrainConfig()), "cascade": asdict(CascadeConfig()), "procedure": asdict(ProcedureConfig())}


def merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of ``base`` with ``update`` applied; keys absent from ``base`` are errors."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in out:
            raise ConfigError(f"unknown config key {path!r}; known keys here: {', '.join(sorted(out))}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section, not a value")
            out[key] = merge(out[key], value, path + ".")
        else:
            out[key] = _checked(path, out[key], value)
    return out


def _checked(path: str, default: Any, value: Any) -> Any:
    """``value`` if it has the type of ``default`` (ints are accepted for floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
    if not ok:
        raise ConfigError(f"config key {path!r} expects a {type(default).__name__}, got {value!r}")
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "cascade.splits=[3,1]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _matches(value: Any, hint: Any) -> bool:
    """Does ``value`` fit the type annotation ``hint`` (``int`` counts as ``float``)?"""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def from_dict(cls, section: dict[str, Any]):
    """Build a config dataclass from its section, checking each value against the field's type."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not _matches(section[f.name], hints[f.name]):
            raise ConfigError(f"config key {cls.SECTION}.{f.name} expects {hints[f.name]}, got {section[f.name]!r}".replace("typing.", ""))
    return cls(**{f.name: section[f.name] for f in fields(cls)})
