"""Our training loop, one executor of a plan's stages: epochs (sized in steps for small data),
validation, lr schedules, early stopping, averaging of the best epochs, clipping, warm-up, bf16
autocast, resume.

The loop trains exactly the parameters that require gradients (the plan froze the rest).
Randomness is a pure function of ``(seed, epoch)``: each epoch reseeds the global RNG
(dropout) and the shuffling generator, so resuming from the last completed epoch needs no
RNG state and reproduces an uninterrupted run bit for bit (on CPU). After every epoch the
loop writes a resume point (weights, optimizer, best weights and loop state) atomically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from topdown import distributed
from topdown.config import TrainConfig
from topdown.console import label, say
from topdown.errors import ConfigError, TrainingError
from topdown.files import load_tensors, prefixed, save_tensors, unprefixed
from topdown.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER, Metric
from topdown.optim import NTASGD
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


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): linear warm-up, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def scheduled_lr(cfg: TrainConfig, base_lr: float, step: int, total_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based) of a stage planned as ``total_steps`` steps,
    a pure function of the step (resume needs no scheduler state). ``plateau``: ``base_lr`` (the
    loop's per-epoch decay) times the warm-up factor. ``onecycle``: cosine rise from lr/25 to lr over
    the first 30 % of the steps, then cosine fall to lr/25/1e4 (as torch's OneCycleLR); the rise is its
    warm-up, so ``warmup_steps`` is ignored. ``cosine``: the warm-up (``warmup_steps``), then cosine
    decay from lr towards 0, which it would reach one step after the last planned one (the last
    step runs at a small positive lr; past it, that step's lr)."""
    if cfg.schedule == "plateau":
        return base_lr * warmup_factor(step, cfg.warmup_steps)
    t = min(step, total_steps - 1)
    if cfg.schedule == "onecycle":
        up = max(1, round(0.3 * total_steps))
        lo, hi, end = cfg.lr / 25, cfg.lr, cfg.lr / 25 / 1e4
        if t < up:
            return hi + (lo - hi) * (1 + math.cos(math.pi * t / up)) / 2
        return end + (hi - end) * (1 + math.cos(math.pi * (t - up) / max(1, total_steps - 1 - up))) / 2
    w = cfg.warmup_steps
    if t < w:
        return cfg.lr * warmup_factor(t, w)
    return cfg.lr * (1 + math.cos(math.pi * (t - w) / max(1, total_steps - w))) / 2


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


def monitored_metric(cfg: TrainConfig, task: Task) -> Metric:
    """The metric that picks the best epoch and drives lr decay and early stopping."""
    name = cfg.monitor or task.metric
    if name == task.metric:
        return task.primary
    try:
        return Metric.named(name)
    except ConfigError:
        raise ConfigError(
            f"train.monitor {name!r}: not a metric whose direction is known ({', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)}, "
            f"a variant of one such as wer_beam, or a name ending in _loss); leave it empty for the task's metric ({task.metric!r})"
        ) from None


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
    step: int = 0  # optimizer steps taken (drives the lr warm-up and train.schedule)
    total_steps: int = 0  # train.schedule other than plateau: the stage's planned steps (recomputed when a stage starts or resumes)


@dataclass
class FitResult:
    epochs: int
    val: dict[str, float]
    seconds: float


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
    device = device or next(model.parameters()).device
    monitor = monitored_metric(cfg, task)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    trained = distributed.wrap(model, device)  # built now that the frozen blocks are frozen
    # The weights of the best `keep` epochs, best first, as (value, epoch, weights): kept[0] is the
    # best epoch, restored at the end; more than one are averaged (train.average_best).
    keep = cfg.average_best if cfg.restore_best else 0
    state, kept = LoopState(lr=cfg.lr), []
    if resume_path is not None and resume_path.is_file():
        state, kept = _load_resume_point(resume_path, model, opt)
    # the stage's planned steps: epochs x the batches of one epoch as drawn with a fixed generator; a
    # task whose batch count varies with the draw (lm-awd's random BPTT lengths) gets an estimate, so its
    # schedule reaches its end a little before or after the last step
    if cfg.schedule != "plateau":
        state.total_steps = cfg.epochs * sum(
            1 for _ in epoch_batches(task, cfg, torch.Generator().manual_seed(0), subset)
        )
    validated = getattr(
        opt, "averaged", nullcontext
    )  # the weights validation sees and keeps (NT-ASGD: the average)

    while not state.done:
        started = time.perf_counter()
        train_loss = _train_epoch(
            trained, task, cfg, opt, params, state, seed=seed, subset=subset, device=device, desc=desc
        )
        with validated():
            val = _validate(model, task, monitor, f"{desc}: epoch {state.epoch + 1}")
            record = {
                "epoch": state.epoch + 1,
                "lr": state.lr if cfg.schedule == "plateau" else opt.param_groups[0]["lr"],
                "train_loss": train_loss,
                "val": val,
            }
            improved = _advance(state, cfg, val, monitor)
            if keep and _ranks_among(kept, val[monitor.name], monitor, keep):
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                _keep(kept, (val[monitor.name], state.epoch, weights), monitor, keep)
        if isinstance(opt, NTASGD) and opt.observe(val[monitor.name], monitor):
            say(f"{desc}: validation stopped improving, averaging from epoch {state.epoch + 1} (NT-ASGD)")
        state.seconds += time.perf_counter() - started
        on_epoch({**record, "max_epochs": cfg.epochs, "seconds": state.seconds})
        say(
            f"{desc} epoch {state.epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val {monitor.name} "
            f"{val[monitor.name]:.4g}{' *' if improved else ''}, lr {record['lr']:.3g}, {state.seconds:.1f}s"
        )
        if resume_path is not None and distributed.is_writer():
            _save_resume_point(resume_path, model, opt, state, kept)

    if cfg.restore_best:
        model.load_state_dict(kept[0][2])
        val = state.best_val
        if len(kept) > 1:
            started = time.perf_counter()
            val = _average_if_no_worse(model, task, monitor, kept, val, desc)
            state.seconds += time.perf_counter() - started
        return FitResult(epochs=state.epoch, val=val, seconds=state.seconds)
    if isinstance(opt, NTASGD):
        opt.keep_average()  # the stage's model is the averaged one, as validated
    return FitResult(epochs=state.epoch, val=state.last_val, seconds=state.seconds)


def _ranks_among(kept: list, value: float, monitor: Metric, n: int) -> bool:
    """Would an epoch with validation ``value`` be among the ``n`` best kept so far?"""
    return len(kept) < n or monitor.better(value, kept[-1][0])


def _keep(kept: list, entry: tuple[float, int, dict[str, torch.Tensor]], monitor: Metric, n: int) -> None:
    """Insert ``(value, epoch, weights)`` into ``kept``, ordered best first, at most ``n`` long
    (an equal value ranks after the earlier epoch)."""
    at = next((i for i, (v, _, _) in enumerate(kept) if monitor.better(entry[0], v)), len(kept))
    kept.insert(at, entry)
    del kept[n:]


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts (accumulated in float32). A tensor that is the same in
    every state (a frozen block's) is kept exactly: a float mean of equal values can move it by a
    rounding step, and a frozen block must not change. Integer buffers, such as BatchNorm's batch
    counter, are the first state's."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point() and not all(torch.equal(s[name], first) for s in states[1:]):
            out[name] = (sum(s[name].float() for s in states) / len(states)).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def _average_if_no_worse(
    model: nn.Module, task: Task, monitor: Metric, kept: list, best_val: dict[str, float], desc: str
) -> dict[str, float]:
    """Load the average of the kept epochs' weights if validation finds it no worse than the best
    epoch, ``kept[0]`` (then return its metrics); otherwise leave the best epoch's weights."""
    model.load_state_dict(average_weights([w for _, _, w in kept]))
    val = _validate(model, task, monitor, f"{desc}: average")
    epochs = ", ".join(str(e) for _, e, _ in sorted(kept, key=lambda k: k[1]))
    if monitor.better(best_val[monitor.name], val[monitor.name]):
        model.load_state_dict(kept[0][2])
        say(
            f"{desc}: the average of epochs {epochs} (val {monitor.name} {val[monitor.name]:.4g}) is worse than the best epoch's "
            f"{best_val[monitor.name]:.4g}; kept the best epoch"
        )
        return best_val
    say(
        f"{desc}: averaged the weights of epochs {epochs}: val {monitor.name} {val[monitor.name]:.4g} "
        f"(best epoch {best_val[monitor.name]:.4g})"
    )
    return val


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
    for group in opt.param_groups:
        group["lr"] = state.lr
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
                f"task {task.name}: loss(model, batch) must return a one-element tensor (that backward() runs "
                f"through), got {type(loss).__name__}{shape}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        if cfg.warmup_steps > 0 or cfg.schedule != "plateau":
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(cfg, state.lr, state.step, state.total_steps)
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


def _validate(model: nn.Module, task: Task, monitor: Metric, where: str) -> dict[str, float]:
    val = evaluate(model, task, "val")
    if monitor.name not in val:
        raise ConfigError(
            f"the validation metrics of {task.name} ({', '.join(val)}) lack {monitor.name!r} "
            "(the task's metric, or train.monitor where set): its evaluate() must return it"
        )
    if not math.isfinite(val[monitor.name]):
        raise TrainingError(f"{where}: validation {monitor.name} is {val[monitor.name]}")
    return val


def _advance(state: LoopState, cfg: TrainConfig, val: dict[str, float], monitor: Metric) -> bool:
    """One epoch's bookkeeping: best so far, plateau lr decay, early stopping, end of stage.
    Returns whether this epoch is the best so far."""
    state.epoch += 1
    state.last_val = val
    value = val[monitor.name]
    improved = monitor.better(value, state.best)
    if improved:
        state.best, state.best_epoch, state.best_val = value, state.epoch, val
        state.bad_epochs = state.plateau = 0
    else:
        state.bad_epochs += 1
        state.plateau += 1
        if state.plateau >= cfg.lr_patience and cfg.lr_decay < 1 and cfg.schedule == "plateau":
            state.lr *= cfg.lr_decay
            state.plateau = 0
    state.done = (
        state.epoch >= cfg.epochs
        or (cfg.early_stop > 0 and state.bad_epochs >= cfg.early_stop)
        or (cfg.schedule == "plateau" and state.lr < cfg.min_lr)
    )
    return improved


def _save_resume_point(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: LoopState, kept: list
) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}  # optimizer state: tensors to safetensors, the rest to JSON metadata
    for pid, st in sd["state"].items():
        for key, value in st.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{pid}.{key}"] = value
    save_tensors(
        path,
        {
            **prefixed("model.", model.state_dict()),
            **prefixed("optim.", tensors),
            **{k: v for i, (_, _, w) in enumerate(kept) for k, v in prefixed(f"kept{i}.", w).items()},
        },
        {
            "loop": asdict(state),
            "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
            "kept": [[value, epoch] for value, epoch, _ in kept],
        },
    )


def _load_resume_point(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[LoopState, list]:
    tensors, meta = load_tensors(path)
    model.load_state_dict(unprefixed("model.", tensors))
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*unprefixed("optim.", tensors).items(), *meta["optimizer"]["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    known = {f.name for f in fields(LoopState)}  # resume points of older versions may hold more
    state = LoopState(**{k: v for k, v in meta["loop"].items() if k in known})
    kept = [
        (value, epoch, unprefixed(f"kept{i}.", tensors))
        for i, (value, epoch) in enumerate(meta.get("kept", []))
    ]
    if not kept and unprefixed(
        "best.", tensors
    ):  # resume points of earlier versions hold the best epoch as "best."
        kept = [(state.best, state.best_epoch, unprefixed("best.", tensors))]
    return state, kept
