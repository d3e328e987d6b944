"""The learning rate, in one place: what each kind of stage starts from (``stage_recipe``,
``finetune_recipe``, ``to_the_last_epoch``) and, within a stage, the lr of every optimizer step
(``LrSchedule``: warm-up, one-cycle, cosine, plateau decay).

Within a stage the lr is a pure function of the step and of the plateau-decayed base lr (the
loop's ``resume_point.LoopState.lr``), so resuming a stage needs no scheduler state of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from topdown.config import RunConfig, TrainConfig

FINETUNE_LR_FACTOR = 0.1  # the fine-tune stage's lr, relative to the stage lr, unless cascade.finetune_lr


@dataclass(frozen=True)
class LrSchedule:
    """The lr schedule of one stage trained with ``train``, planned as ``total_steps`` optimizer
    steps (needed by ``onecycle`` and ``cosine`` only).

    ``plateau``: the base lr, multiplied by ``lr_decay`` after ``lr_patience`` epochs without
    improvement (``after_epoch``), times a linear warm-up over ``warmup_steps``; the stage ends
    once it falls below ``min_lr`` (``exhausted``). ``onecycle``: cosine rise from lr/25 to lr
    over the first 30 % of the steps, then cosine fall to lr/25/1e4 (as torch's OneCycleLR); the
    rise is its warm-up, so ``warmup_steps`` is ignored. ``cosine``: the warm-up, then cosine
    decay from lr towards 0, which it would reach one step after the last planned one (the last
    step runs at a small positive lr; past it, that step's lr). Neither decays on plateaus."""

    train: TrainConfig
    total_steps: int = 0

    @property
    def plateau(self) -> bool:
        return self.train.schedule == "plateau"

    def lr(self, step: int, base_lr: float) -> float:
        """The lr of optimizer step ``step`` (0-based); ``base_lr`` is the plateau-decayed lr
        (what ``after_epoch`` made of ``train.lr``), which only ``plateau`` reads."""
        cfg = self.train
        if self.plateau:
            return base_lr * _warmup(step, cfg.warmup_steps)
        t = min(step, self.total_steps - 1)
        if cfg.schedule == "onecycle":
            up = max(1, round(0.3 * self.total_steps))
            lo, hi, end = cfg.lr / 25, cfg.lr, cfg.lr / 25 / 1e4
            if t < up:
                return hi + (lo - hi) * (1 + math.cos(math.pi * t / up)) / 2
            down = max(1, self.total_steps - 1 - up)
            return end + (hi - end) * (1 + math.cos(math.pi * (t - up) / down)) / 2
        w = cfg.warmup_steps
        if t < w:
            return cfg.lr * _warmup(t, w)
        return cfg.lr * (1 + math.cos(math.pi * (t - w) / max(1, self.total_steps - w))) / 2

    def epoch_lr(self, steps: int, base_lr: float) -> float:
        """The lr an epoch that ended after ``steps`` steps in all is recorded with: the base lr
        (``plateau``), or that of its last step."""
        return base_lr if self.plateau else self.lr(steps - 1, base_lr)

    def after_epoch(self, base_lr: float, plateau_epochs: int) -> tuple[float, int]:
        """The base lr and the count of epochs since the last improvement or decay, after an
        epoch that ended ``plateau_epochs`` such epochs: ``plateau`` decays the lr (and restarts
        the count) once ``lr_patience`` are reached."""
        cfg = self.train
        if self.plateau and plateau_epochs >= cfg.lr_patience and cfg.lr_decay < 1:
            return base_lr * cfg.lr_decay, 0
        return base_lr, plateau_epochs

    def exhausted(self, base_lr: float) -> bool:
        """Has plateau decay taken the lr below ``train.min_lr`` (which ends the stage)?"""
        return self.plateau and base_lr < self.train.min_lr

    @staticmethod
    def stage_recipe(config: RunConfig) -> TrainConfig:
        """The recipe of a stage after the first (cascade, retrain-classifier, transfer, forget):
        the cascade's epochs and lr, where set, in place of the baseline's."""
        cc, train = config.cascade, config.train
        return train.replace(epochs=cc.epochs or train.epochs, lr=cc.lr if cc.lr is not None else train.lr)

    @staticmethod
    def finetune_recipe(config: RunConfig) -> TrainConfig:
        """The cascade's final fine-tune of all blocks: the stage recipe for
        ``cascade.finetune_epochs``, at ``cascade.finetune_lr`` (default a tenth of the stage lr)."""
        cc, stage = config.cascade, LrSchedule.stage_recipe(config)
        lr = cc.finetune_lr if cc.finetune_lr is not None else FINETUNE_LR_FACTOR * stage.lr
        return stage.replace(epochs=cc.finetune_epochs, lr=lr)

    @staticmethod
    def to_the_last_epoch(train: TrainConfig, epochs: int) -> TrainConfig:
        """``train`` for exactly ``epochs`` epochs: early stopping off and, under ``plateau``, the
        lr floor ``min_lr`` too (the other schedules have none)."""
        floor = {"min_lr": 0.0} if train.schedule == "plateau" else {}
        return train.replace(epochs=epochs, early_stop=0, **floor)


def _warmup(step: int, warmup_steps: int) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): linear warm-up, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
