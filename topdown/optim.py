"""The optimizers our loop trains with (``make_optimizer``, as ``train.optimizer`` names them), how
an optimizer takes part in validation (``ValidationHooks``, the loop's one hook into it), and
NT-ASGD (Merity et al.'s non-monotonically triggered averaged SGD) as an optimizer, so that any
loop can use it: plain SGD until validation stops improving, then SGD that also keeps the running
average of its iterates; the average is what is validated and kept."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from topdown.config import TrainConfig
from topdown.errors import ConfigError
from topdown.metrics import Metric


class ValidationHooks:
    """What the loop asks of an optimizer around each epoch's validation. These defaults are a
    plain optimizer's (the weights as trained, nothing learnt from validation); an optimizer that
    inherits this class as well overrides what it needs (``validation_hooks`` finds it)."""

    def validated(self) -> AbstractContextManager[None]:
        """The weights validation sees (and the loop keeps) are in the model for the duration."""
        return nullcontext()

    def on_validation(self, value: float, metric: Metric) -> str | None:
        """An epoch's validation ``value`` of ``metric`` (``train.monitor``); returns a line for
        the progress log when the optimizer changes course."""
        return None

    def keep_validated(self) -> None:
        """At the end of a stage that keeps its last epoch: leave the validated weights in the model."""


def validation_hooks(opt: torch.optim.Optimizer) -> ValidationHooks:
    """``opt``'s hooks, or a plain optimizer's."""
    return opt if isinstance(opt, ValidationHooks) else ValidationHooks()


class NTASGD(torch.optim.SGD, ValidationHooks):
    """SGD plus the trigger and the average, through the validation hooks: after each epoch's
    validation call ``on_validation``; validate (and save) inside ``validated()``; at the end
    ``keep_validated()`` if the model is to be the average. The trigger's history and the average
    live in the optimizer's state dict, so a resume point carries them."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nonmono: int = 5):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.nonmono = nonmono
        # kept in the first param group, so state_dict() / load_state_dict() carry them
        self.param_groups[0].setdefault("nt_history", [])  # validation value per epoch before averaging
        self.param_groups[0].setdefault("nt_averaged_steps", 0)  # iterates in the average; 0 = not averaging

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def averaging(self) -> bool:
        return self.param_groups[0]["nt_averaged_steps"] > 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        group = self.param_groups[0]
        if group["nt_averaged_steps"]:
            group["nt_averaged_steps"] += 1
            params = self._params()
            torch._foreach_lerp_(
                [self.state[p]["ax"] for p in params], params, 1.0 / group["nt_averaged_steps"]
            )
        return loss

    def on_validation(self, value: float, metric: Metric) -> str | None:
        """The trigger: averaging starts once an epoch's validation ``value`` is worse than the
        best of all epochs but the last ``nonmono``."""
        group = self.param_groups[0]
        if self.averaging:
            return None
        history = group["nt_history"]
        older = history[: -self.nonmono] if self.nonmono > 0 else history
        started = bool(older) and metric.better(metric.best(older), value)
        if started:
            for p in self._params():
                self.state[p]["ax"] = p.detach().clone()
            group["nt_averaged_steps"] = 1
        history.append(value)
        return "validation stopped improving, averaging from here (NT-ASGD)" if started else None

    @contextmanager
    def validated(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (the raw iterates before averaging)."""
        if not self.averaging:
            yield
            return
        params = self._params()
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, [self.state[p]["ax"] for p in params])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)

    def keep_validated(self) -> None:
        """The averaged weights, once averaging has started, stay in the model."""
        if self.averaging:
            params = self._params()
            with torch.no_grad():
                torch._foreach_copy_(params, [self.state[p]["ax"] for p in params])


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over exactly the trainable parameters (frozen ones are never in it)."""
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "ntasgd":
        return NTASGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nonmono=cfg.nonmono
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
