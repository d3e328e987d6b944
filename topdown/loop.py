"""Our training loop, one executor of a plan's stages: epochs (sized in steps for small data),
validation, the lr schedule (``schedule.LrSchedule``), early stopping, clipping, bf16 autocast.

Two metrics steer a stage. ``train.monitor`` (default the task's metric) drives plateau lr decay
and early stopping; the weights the stage ends with, its best epoch's or the average of its best
epochs, are chosen by the task's metric, the one that decides acceptance (``best_epochs``).

The loop trains exactly the parameters that require gradients (the plan froze the rest), with
the optimizer ``train.optimizer`` names (``optim.make_optimizer``). Randomness is a pure function
of ``(seed, epoch)``: each epoch reseeds the global RNG (dropout) and the shuffling generator, so
resuming from the last completed epoch needs no RNG state and reproduces an uninterrupted run bit
for bit (on CPU). After every epoch the loop writes a resume point (``resume_point``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from topdown import distributed
from topdown.best_epochs import Ranking, average_if_no_worse, keep_epoch, ranks_among
from topdown.config import TrainConfig
from topdown.console import label, say
from topdown.errors import ConfigError, TrainingError
from topdown.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER, Metric
from topdown.optim import make_optimizer, validation_hooks
from topdown.resume_point import LoopState, load_resume_point, resumed_ranking, save_resume_point
from topdown.schedule import LrSchedule
from topdown.seeds import derive_seed
from topdown.task import Task

LOSS_CHECK_STEPS = 50  # on an accelerator, how often the summed training loss is read (a host-device sync)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``. A copy to a GPU goes through pinned
    host memory, so that it is asynchronous (from pageable memory ``non_blocking`` is not)."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def monitored_metric(cfg: TrainConfig, task: Task) -> Metric:
    """The metric that drives plateau lr decay and early stopping (and breaks ties between epochs
    equal on the task's metric)."""
    name = cfg.monitor or task.metric
    if name == task.metric:
        return task.primary
    try:
        return Metric.named(name)
    except ConfigError:
        raise ConfigError(
            f"train.monitor {name!r}: not a metric whose direction is known "
            f"({', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)}, a variant of one such as wer_beam, "
            f"or a name ending in _loss); leave it empty for the task's metric ({task.metric!r})"
        ) from None


@dataclass
class FitResult:
    epochs: int
    val: dict[str, float]  # the validation metrics of the weights the model ends with
    seconds: float
    # the epoch whose weights the model ends with (ranked by the task's metric, or the last one
    # without train.restore_best); None when it ends with an average of epochs (train.average_best)
    kept_epoch: int | None = None


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
    the epoch whose weights the model ends with, and that epoch. Resumes from ``resume_path`` if
    it exists."""
    device = device or next(model.parameters()).device
    monitor = monitored_metric(cfg, task)
    ranking = Ranking.of(task, monitor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    hooks = validation_hooks(opt)  # NT-ASGD validates (and keeps) its averaged weights
    trained = distributed.wrap(model, device)  # built now that the frozen blocks are frozen
    # The weights of the best `keep` epochs, best first, as (validation metrics, epoch, weights):
    # kept[0] is the epoch restored at the end; more than one are averaged (train.average_best).
    keep = cfg.average_best if cfg.restore_best else 0
    state, kept = LoopState(lr=cfg.lr), []
    if resume_path is not None and resume_path.is_file():
        state, kept, ranked_by = load_resume_point(resume_path, model, opt)
        ranking, kept = resumed_ranking(kept, ranked_by, state, task, monitor)
    # the stage's planned steps: epochs x the batches of one epoch as drawn with a fixed generator; a
    # task whose batch count varies with the draw (lm-awd's random BPTT lengths) gets an estimate, so its
    # schedule reaches its end a little before or after the last step
    if cfg.schedule != "plateau":
        state.total_steps = cfg.epochs * sum(
            1 for _ in epoch_batches(task, cfg, torch.Generator().manual_seed(0), subset)
        )
    schedule = LrSchedule(cfg, state.total_steps)

    while not state.done:
        started = time.perf_counter()
        train_loss = _train_epoch(
            trained, task, cfg, opt, params, state, seed=seed, subset=subset, device=device, desc=desc
        )
        with hooks.validated():
            val = _validate(model, task, ranking.names + [monitor.name], f"{desc}: epoch {state.epoch + 1}")
            record = {
                "epoch": state.epoch + 1,
                "lr": schedule.epoch_lr(state.step, state.lr),
                "train_loss": train_loss,
                "val": val,
            }
            improved = _advance(state, schedule, val, monitor)
            if keep and ranks_among(kept, val, ranking, keep):
                keep_epoch(kept, val, state.epoch, model, ranking, keep)
        if note := hooks.on_validation(val[monitor.name], monitor):
            say(f"{desc}, epoch {state.epoch}: {note}")
        state.seconds += time.perf_counter() - started
        on_epoch({**record, "max_epochs": cfg.epochs, "seconds": state.seconds})
        say(
            f"{desc} epoch {state.epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val {monitor.name} "
            f"{val[monitor.name]:.4g}{' *' if improved else ''}{_also(val, ranking.first, monitor)}, "
            f"lr {record['lr']:.3g}, {state.seconds:.1f}s"
        )
        if resume_path is not None and distributed.is_writer():
            save_resume_point(resume_path, model, opt, state, kept, ranking)

    if cfg.restore_best:
        val, kept_epoch, weights = kept[0]
        model.load_state_dict(weights)
        if len(kept) > 1:
            started = time.perf_counter()
            val, kept_epoch = average_if_no_worse(
                model, ranking, kept, lambda: _validate(model, task, ranking.names, f"{desc}: average"), desc
            )
            state.seconds += time.perf_counter() - started
        return FitResult(epochs=state.epoch, val=val, seconds=state.seconds, kept_epoch=kept_epoch)
    hooks.keep_validated()  # the stage's model is the one validated (NT-ASGD: the average)
    return FitResult(epochs=state.epoch, val=state.last_val, seconds=state.seconds, kept_epoch=state.epoch)


def _also(val: Mapping[str, float], metric: Metric, monitor: Metric) -> str:
    """The task's metric for the progress line, where the monitored one is another."""
    return "" if metric.name == monitor.name else f", {metric.name} {val[metric.name]:.4g}"


def _train_epoch(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    state: LoopState,
    *,
    seed: int,
    subset: float,
    device: torch.device,
    desc: str,
) -> float:
    """One epoch of training (see ``epoch_batches``); returns the mean training loss."""
    torch.manual_seed(derive_seed(seed, state.epoch, 1))
    generator = torch.Generator().manual_seed(derive_seed(seed, state.epoch, 2))
    schedule = LrSchedule(cfg, state.total_steps)
    model.train()
    # The loss is summed on the device: reading it (``.item()``) waits for the GPU, so that happens
    # only every ``check_every`` steps (every step on a CPU, where it costs nothing).
    check_every = 1 if device.type == "cpu" else LOSS_CHECK_STEPS
    total, count = torch.zeros((), device=device), 0
    batches = epoch_batches(task, cfg, generator, subset)
    bar = tqdm(
        batches,
        desc=f"{label()}{desc} epoch {state.epoch + 1}",
        leave=False,
        unit="batch",
        disable=None if distributed.is_writer() else True,
    )
    for batch in bar:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss = task.loss(model, move_to(batch, device))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
            raise ConfigError(
                f"task {task.name}: loss(model, batch) must return a one-element tensor (that backward() "
                f"runs through), got {type(loss).__name__}{shape}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        for group in opt.param_groups:  # the one place the lr is set
            group["lr"] = schedule.lr(state.step, state.lr)
        total, count = total + loss.detach().float(), count + 1
        if count % check_every == 0:
            _check_finite(total, desc, state)
            bar.set_postfix(loss=f"{total.item() / count:.3f}")
        opt.step()
        state.step += 1
    if count == 0:
        raise TrainingError(f"{desc}: the training set yielded no batches")
    _check_finite(total, desc, state)
    return total.item() / count


def epoch_batches(task: Task, cfg: TrainConfig, generator: torch.Generator, subset: float) -> Iterator[Any]:
    """One epoch's batches (under DDP, this rank's share; every rank takes as many steps): passes
    over the training set, each reshuffled by ``generator``, until ``cfg.min_epoch_steps`` steps."""
    steps = 0
    while True:
        before = steps
        for batch in distributed.shard(task.train_batches(generator, subset)):
            steps += 1
            yield batch
        if steps == before or steps >= cfg.min_epoch_steps:
            return


def _check_finite(total: torch.Tensor, desc: str, state: LoopState) -> None:
    """Fail the stage once a loss was non-finite (the sum since the epoch began is then too)."""
    if not torch.isfinite(total):
        raise TrainingError(
            f"{desc}: loss is {total.item()} at epoch {state.epoch + 1} (lr {state.lr:g}); the stage failed"
        )


def evaluate(model: nn.Module, task: Task, split: str) -> dict[str, float]:
    """The task's metrics of ``model`` on ``split``; under DDP computed once, on rank 0, and
    handed to every rank, so every rank takes the same decisions."""
    val = None
    if distributed.is_writer():
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model, split)
            if not isinstance(metrics, Mapping):
                raise ConfigError(
                    f"task {task.name}: evaluate(model, {split!r}) must return a dict of metrics "
                    f"(e.g. {{{task.metric!r}: 0.12}}), got {type(metrics).__name__}"
                )
            val = {k: float(v) for k, v in metrics.items()}
    return distributed.same_on_every_rank(val)


def _validate(model: nn.Module, task: Task, needed: list[str], where: str) -> dict[str, float]:
    """The validation metrics, which must hold the ``needed`` ones (the task's metric and
    ``train.monitor``), finite."""
    val = evaluate(model, task, "val")
    for name in dict.fromkeys(needed):
        if name not in val:
            raise ConfigError(
                f"the validation metrics of {task.name} ({', '.join(val)}) lack {name!r} "
                "(the task's metric, or train.monitor where set): its evaluate() must return it"
            )
        if not math.isfinite(val[name]):
            raise TrainingError(f"{where}: validation {name} is {val[name]}")
    return val


def _advance(state: LoopState, schedule: LrSchedule, val: dict[str, float], monitor: Metric) -> bool:
    """One epoch's bookkeeping by ``train.monitor``: best so far, plateau lr decay, early stopping,
    end of stage. Returns whether this epoch is the best so far."""
    cfg = schedule.train
    state.epoch += 1
    state.last_val = val
    value = val[monitor.name]
    improved = monitor.better(value, state.best)
    if improved:
        state.best, state.best_epoch, state.best_val = value, state.epoch, val
        state.bad_epochs = state.plateau = 0
    else:
        state.bad_epochs += 1
        state.lr, state.plateau = schedule.after_epoch(state.lr, state.plateau + 1)
    state.done = (
        state.epoch >= cfg.epochs
        or (cfg.early_stop > 0 and state.bad_epochs >= cfg.early_stop)
        or schedule.exhausted(state.lr)
    )
    return improved
