"""The one training loop: epochs, validation, plateau lr decay, early stopping, clipping, resume.

The loop trains exactly the parameters that require gradients (the procedures freeze the
rest). With ``train.optimizer: ntasgd`` (AWD-LSTM's non-monotonically triggered averaged
SGD) the loop runs SGD until validation stops improving (``train.nonmono``), then also
keeps the running average of the iterates; from then on validation, the best weights and
the stage's final model are the averaged weights. Randomness is a pure function of
``(seed, epoch)``: each epoch reseeds the global RNG (dropout) and the shuffling
generator, so resuming from the last completed epoch needs no RNG state and reproduces
an uninterrupted run bit for bit (on CPU).
After every epoch the loop writes a resume point (weights, optimizer, best weights and
loop state) atomically.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import ConfigError, TrainingError
from .runs import load_tensors, prefixed, save_tensors, unprefixed
from .task import Task


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (run seed, stage, candidate, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): linear warm-up, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over exactly the trainable parameters (frozen ones are never in it)."""
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("sgd", "ntasgd"):  # ntasgd: the averaging is the loop's (see `fit`)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r} (adam, adamw, sgd, ntasgd)")


@dataclass
class LoopState:
    """Everything the loop needs to continue after its last completed epoch."""

    epoch: int = 0
    lr: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # since the last improvement (early stopping)
    plateau: int = 0  # since the last improvement or lr decay
    done: bool = False
    seconds: float = 0.0
    step: int = 0  # optimizer steps taken (drives the lr warm-up)
    history: list[float] = field(default_factory=list)  # ntasgd: monitored value per epoch before averaging
    averaging_from: int = 0  # ntasgd: epoch after which averaging started (0 = not yet)
    averaged_steps: int = 0  # ntasgd: iterates in the running average


@dataclass
class FitResult:
    epochs: int
    val: dict[str, float]
    seconds: float


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    *,
    seed: int,
    subset: float = 1.0,
    resume_path: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] = lambda record: None,
    desc: str = "train",
    device: torch.device | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters with ``cfg``; returns the validation metrics of
    the epoch whose weights the model ends with. Resumes from ``resume_path`` if it exists."""
    if cfg.epochs < 1:
        raise ConfigError(f"{desc}: train.epochs must be at least 1, got {cfg.epochs}")
    if cfg.amp not in ("", "bf16"):
        raise ConfigError(f"{desc}: train.amp must be '' (off) or 'bf16', got {cfg.amp!r}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"{desc}: train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    device = device or next(model.parameters()).device
    monitor = cfg.monitor or task.metric
    lower = task.lower_is_better if monitor == task.metric else True  # other metrics are losses or error rates

    def better(a: float, b: float | None) -> bool:
        return b is None or (a < b if lower else a > b)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = make_optimizer(params, cfg)
    state = LoopState(lr=cfg.lr)
    best_weights: dict[str, torch.Tensor] | None = None
    average: list[torch.Tensor] = []  # ntasgd: running mean of the trainable parameters, once averaging
    if resume_path is not None and resume_path.is_file():
        tensors, meta = load_tensors(resume_path)
        model.load_state_dict(unprefixed("model.", tensors))
        best_weights = unprefixed("best.", tensors) or None
        _load_optimizer(opt, unprefixed("optim.", tensors), meta["optimizer"])
        state = LoopState(**meta["loop"])
        saved_average = unprefixed("average.", tensors)
        average = [saved_average[n].to(p.device) for n, p in named] if saved_average else []

    while not state.done:
        started = time.perf_counter()
        torch.manual_seed(derive_seed(seed, state.epoch, 1))
        generator = torch.Generator().manual_seed(derive_seed(seed, state.epoch, 2))
        for group in opt.param_groups:
            group["lr"] = state.lr
        model.train()
        total, count = 0.0, 0
        bar = tqdm(task.train_batches(generator, subset), desc=f"{desc} epoch {state.epoch + 1}", leave=False, unit="batch", disable=None)
        for batch in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                loss = task.loss(model, move_to(batch, device))
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: loss is {loss.item()} at epoch {state.epoch + 1} (lr {state.lr:g}); the stage failed")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            if cfg.warmup_steps > 0:
                for group in opt.param_groups:
                    group["lr"] = state.lr * warmup_factor(state.step, cfg.warmup_steps)
            opt.step()
            state.step += 1
            if average:
                state.averaged_steps += 1
                with torch.no_grad():
                    torch._foreach_lerp_(average, params, 1.0 / state.averaged_steps)
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        if count == 0:
            raise TrainingError(f"{desc}: the training set yielded no batches")
        model.eval()
        raw = _swap_in(params, average)  # evaluate (and keep as best) the averaged weights
        with torch.no_grad():
            val = {k: float(v) for k, v in task.evaluate(model, "val").items()}
        if monitor not in val:
            raise ConfigError(f"train.monitor {monitor!r} is not a validation metric of {task.name} ({', '.join(val)})")
        if not math.isfinite(val[monitor]):
            raise TrainingError(f"{desc}: validation {monitor} is {val.get(monitor)} at epoch {state.epoch + 1}")
        record = {"epoch": state.epoch + 1, "lr": state.lr, "train_loss": total / count, "val": val}
        state.last_val = val
        _advance(state, cfg, val[monitor], better)
        if state.best_epoch == state.epoch:
            state.best_val = val
        if state.best_epoch == state.epoch and cfg.restore_best:
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _swap_back(params, raw)
        if cfg.optimizer == "ntasgd" and not average:
            older = state.history[: -cfg.nonmono] if cfg.nonmono > 0 else state.history
            if older and better(min(older) if lower else max(older), val[monitor]):
                average = [p.detach().clone() for p in params]  # average the iterates from here on
                state.averaging_from, state.averaged_steps = state.epoch, 1
                tqdm.write(f"{desc}: validation stopped improving, averaging from epoch {state.epoch + 1} (NT-ASGD)", file=sys.stderr)
            state.history.append(val[monitor])
        state.seconds += time.perf_counter() - started
        record["seconds"] = state.seconds
        on_epoch(record)
        tqdm.write(
            f"{desc} epoch {state.epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
            f"val {monitor} {val[monitor]:.4g}{' *' if state.best_epoch == state.epoch else ''}, "
            f"lr {record['lr']:.3g}, {state.seconds:.1f}s",
            file=sys.stderr,
        )
        if resume_path is not None:
            opt_tensors, opt_meta = _optimizer_tensors(opt)
            save_tensors(
                resume_path,
                {
                    **prefixed("model.", model.state_dict()),
                    **prefixed("best.", best_weights or {}),
                    **prefixed("optim.", opt_tensors),
                    **prefixed("average.", {n: a for (n, _), a in zip(named, average)}),
                },
                {"loop": asdict(state), "optimizer": opt_meta},
            )

    if cfg.restore_best:
        model.load_state_dict(best_weights)
        return FitResult(epochs=state.epoch, val=state.best_val, seconds=state.seconds)
    _swap_in(params, average)  # the stage's model is the averaged one, as validated
    return FitResult(epochs=state.epoch, val=state.last_val, seconds=state.seconds)


def _swap_in(params: list[nn.Parameter], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy ``values`` into ``params`` (if any); returns the overwritten values for ``_swap_back``."""
    if not values:
        return []
    with torch.no_grad():
        raw = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, values)
    return raw


def _swap_back(params: list[nn.Parameter], raw: list[torch.Tensor]) -> None:
    if raw:
        with torch.no_grad():
            torch._foreach_copy_(params, raw)


def _advance(state: LoopState, cfg: TrainConfig, value: float, better: Callable[[float, float | None], bool]) -> None:
    """One epoch's bookkeeping: best so far, plateau lr decay, early stopping, end of stage."""
    state.epoch += 1
    if better(value, state.best):
        state.best, state.best_epoch = value, state.epoch
        state.bad_epochs = state.plateau = 0
    else:
        state.bad_epochs += 1
        state.plateau += 1
        if state.plateau >= cfg.lr_patience and cfg.lr_decay < 1:
            state.lr *= cfg.lr_decay
            state.plateau = 0
    state.done = (
        state.epoch >= cfg.epochs
        or (cfg.early_stop > 0 and state.bad_epochs >= cfg.early_stop)
        or state.lr < cfg.min_lr
    )
