"""The run configuration: one typed object, resolved once where a run starts, validated in one place.

A run's configuration is a ``RunConfig``: the method's sections (``train``, one stage's
recipe; ``cascade``, the cascade's options; ``procedure``, split and subset) as typed
sections, plus the task's own sections (``data``, ``model``, ...). Every field states
its constraint once, where it is declared (``option(default, ge=..., choices=...)``; see
``sections``); a value outside it is refused when the object is built, naming the key, the value
and what is allowed.

A configuration is changed only through its typed sections (``RunConfig.updated``: each section
rebuilt by ``dataclasses.replace`` and checked again); on the command line the layers (the task's
defaults, its preset, a ``--config`` file: ``load_config_file``, ``--set`` overrides:
``parse_overrides``) are applied so, one after the other. Only keys that exist can be set, so a
typo is an error rather than a silently ignored option.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from topdown.errors import ConfigError
from topdown.sections import CommandLineValue, Section, TaskSections, YamlLoader, option


@dataclass(frozen=True)
class TrainConfig(Section):
    """One stage's training recipe: by default the learning rate decays on validation plateaus
    (``schedule``: or follows a one-cycle or cosine curve over the planned steps), and the weights of
    the best validation epoch, by the task's metric, end the stage."""

    SECTION: typing.ClassVar[str] = "train"

    epochs: int = option(10, ge=1)  # at most this many epochs
    # an epoch is at least this many optimizer steps: a smaller training set is passed over
    # again (reshuffled) within the epoch, so that a recipe's epochs, patience and schedule mean
    # the same amount of training on a corpus of any size; 0 = one pass
    min_epoch_steps: int = option(0, ge=0)
    # ntasgd: sgd, then averaged sgd once validation stops improving
    optimizer: str = option("adam", choices=("adam", "adamw", "sgd", "ntasgd"))
    lr: float = option(1e-3, ge=0)  # 0 trains nothing (a control that keeps the starting weights)
    weight_decay: float = option(0.0, ge=0)
    momentum: float = option(0.9, ge=0, lt=1)  # sgd only
    clip: float = option(5.0, ge=0)  # gradient-norm clipping; 0 turns it off
    # multiply the lr by this after `lr_patience` epochs without improvement of `monitor`
    lr_decay: float = option(0.5, gt=0, le=1)
    lr_patience: int = option(1, ge=1)
    min_lr: float = option(0.0, ge=0)  # stop once the lr falls below this
    early_stop: int = option(0, ge=0)  # stop after this many epochs without improvement; 0 = never
    # end the stage with the weights of its best epoch on validation: ranked by the task's metric
    # (the one that decides acceptance), ties by `monitor`; false: with its last epoch's
    restore_best: bool = True
    # > 1 (with restore_best): end the stage with the average of the weights of its N best epochs
    # on validation (as ESPnet averages its best checkpoints), kept only if validation finds the
    # average no worse than the best epoch
    average_best: int = option(1, ge=1)
    # the validation metric that drives lr decay (lr_patience) and early stopping, and breaks ties
    # between epochs equal on the task's metric; "" = the task's metric. It does not pick the kept
    # epoch: the task's metric does, as it decides acceptance (ASR watches the CTC loss, as WER sits
    # at 100 % through CTC's first, all-blank epochs; see best_epochs.Ranking)
    monitor: str = ""
    # ntasgd: start averaging once validation is worse than the best of all epochs but the last `nonmono`
    nonmono: int = option(5, ge=0)
    # "bf16": mixed precision (autocast) for the training forward pass
    amp: str = option("", choices=("", "bf16"))
    # > 0: the lr ramps linearly from lr/warmup_steps to lr over this many batches (per stage);
    # plateau and cosine only (onecycle rises over its first 30 %)
    warmup_steps: int = option(0, ge=0)
    # lr schedule: "plateau" = decay by lr_decay on validation plateaus (min_lr ends the stage);
    # "onecycle" / "cosine" = lr a pure function of the step over the stage's planned steps
    # (epochs x batches), no plateau decay; onecycle: up from lr/25 over 30 %, then down to ~0;
    # cosine: warmup_steps, then down to 0. See schedule.LrSchedule.
    schedule: str = option("plateau", choices=("plateau", "onecycle", "cosine"))


@dataclass(frozen=True)
class CascadeConfig(Section):
    """Options of the top-down cascade. Defaults are ours, not the paper's: its abstract
    gives none of them. See docs/method.md."""

    SECTION: typing.ClassVar[str] = "cascade"

    splits: list[int] | None = option(
        None, ge=1
    )  # strictly descending; default every split L-1..1 with a parameter on both sides
    epochs: int | None = option(None, ge=1)  # per stage; default train.epochs
    lr: float | None = option(None, ge=0)  # per stage; default train.lr
    reinit: bool = True  # False: warm-start the feature extractor (ablation)
    candidates: int = option(1, ge=1)  # models per stage (different seeds); the best on validation competes
    patience: int | None = option(None, ge=1)  # stop after this many rejected stages in a row
    finetune_epochs: int = option(0, ge=0)  # > 0: a final stage training all blocks jointly (ablation)
    finetune_lr: float | None = option(None, ge=0)  # default 0.1 * the stage lr
    frozen_dropout: bool = False  # keep dropout active inside frozen blocks

    def check_relations(self) -> None:
        s = self.splits
        if s == []:
            raise ConfigError(
                "cascade.splits is empty: name at least one split, or leave it unset for every usable split "
                "(L-1, ..., 1)"
            )
        if s is not None and any(a <= b for a, b in zip(s, s[1:])):
            raise ConfigError(f"cascade.splits must be strictly descending, got {s!r}")


@dataclass(frozen=True)
class ProcedureConfig(Section):
    SECTION: typing.ClassVar[str] = "procedure"
    split: int | None = option(
        None, ge=1
    )  # retrain-classifier, transfer-classifier, forget (default: the cascade's first split)
    subset: float | None = option(None, gt=0, lt=1)  # transfer-classifier: fraction of the training data
    # forget, knowledge-evolution, shrink-perturb: rounds (generations) after the baseline
    # (default: as many as the cascade has splits)
    rounds: int | None = option(None, ge=1)
    # knowledge-evolution: the KELS split rate s, the fraction of each layer's outputs and inputs kept
    # (default 0.5)
    split_rate: float | None = option(None, gt=0, lt=1)
    shrink: float | None = option(None, ge=0)  # shrink-perturb: λ in θ ← λ·θ + p·θ_fresh (default 0.4)
    perturb: float | None = option(None, ge=0)  # shrink-perturb: p (default 0.1)


METHOD_SECTIONS = {cls.SECTION: cls for cls in (TrainConfig, CascadeConfig, ProcedureConfig)}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is configured by: the method's typed sections and the task's own sections.

    ``task`` holds the task's sections (``data``, ``model``, ...), typed as the task declares
    them (its ``SECTIONS``); ``from_dict(..., task_sections=...)`` types them from a nested dict
    (``tasks.resolve_config`` does)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    procedure: ProcedureConfig = field(default_factory=ProcedureConfig)
    task: TaskSections = field(default_factory=TaskSections)
    # every declared option's default (method and task sections): a run recorded before an
    # option existed behaved as its default, so resuming it with that default is no change
    option_defaults: Mapping[str, Any] = field(
        default_factory=lambda: {n: c.defaults() for n, c in METHOD_SECTIONS.items()},
        compare=False,
        repr=False,
    )

    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any], task_sections: Mapping[str, type[Section]] | None = None
    ) -> RunConfig:
        """Type a nested dict (a missing section or key takes its default); the task's sections are
        typed as ``task_sections`` (the task's ``SECTIONS``) declares them. A section that is
        neither the method's nor declared is an error."""
        declared = {**METHOD_SECTIONS, **(task_sections or {})}
        if unknown := sorted(set(config) - set(declared), key=str):
            raise ConfigError(f"unknown config section {unknown[0]!r}; sections here: {', '.join(declared)}")
        typed = {
            name: section_cls.from_dict(config.get(name) or {}) for name, section_cls in declared.items()
        }
        return cls(
            **{name: typed[name] for name in METHOD_SECTIONS},
            task=TaskSections({name: typed[name] for name in task_sections or {}}),
            option_defaults={name: section_cls.defaults() for name, section_cls in declared.items()},
        )

    def as_dict(self) -> dict[str, Any]:
        """The nested dict recorded in ``summary.json`` and in every checkpoint."""
        return {
            **{name: asdict(getattr(self, name)) for name in METHOD_SECTIONS},
            **{name: asdict(section) for name, section in self.task.items()},
        }

    def updated(self, changes: Mapping[str, Any]) -> RunConfig:
        """A copy with ``changes`` applied: per section, a nested dict of keys to change or a whole
        section (``{"train": {"lr": 0.01}}``, ``{"train": train}``), each section rebuilt and checked
        again (``Section.updated``); an unknown section or key is an error."""
        method, task = {}, dict(self.task)
        for name, section_changes in changes.items():
            if name in METHOD_SECTIONS:
                method[name] = getattr(self, name).updated(section_changes, name)
            elif name in task:
                task[name] = task[name].updated(section_changes, name)
            else:
                known = ", ".join([*METHOD_SECTIONS, *task])
                raise ConfigError(f"unknown config key {name!r}; known keys here: {known}")
        return dataclasses.replace(self, **method, task=TaskSections(task))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "cascade.splits=[3,1]"]`` -> nested dict of ``CommandLineValue``s, typed
    when applied to the configuration (``RunConfig.updated``), where each key's type is known."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--set {key}: {'.'.join(parents[:depth])} was given a value, so it has no keys to set"
                )
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"--set {key}: keys under {key} were set, so it cannot also be given a value")
        node[leaf] = CommandLineValue(raw)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A ``--config`` file: a YAML mapping of config sections to the keys to change (``train: {lr:
    0.01}``; some sections or all, as a run directory's ``config.yaml`` has them), the layer
    ``RunConfig.updated`` applies and checks. An unreadable file, or one that is not such a mapping,
    is an error naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path}: cannot read the config file: {getattr(e, 'strerror', None) or e}"
        ) from None
    try:
        layer = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not YAML{where}: {problem}") from None
    if layer is None:  # an empty file changes nothing
        return {}
    if not isinstance(layer, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config sections to keys (e.g. train: {{lr: 0.01}}), "
            f"got a {type(layer).__name__}"
        )
    return layer
