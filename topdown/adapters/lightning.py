"""PyTorch Lightning as the executor of a topdown plan: one ``Trainer.fit`` per stage.

    plan = topdown.Cascade(MyLitModule(), blocks, build_model=MyLitModule, metric="wer", out="runs/x")
    fit_plan(plan, lambda stage: L.Trainer(max_epochs=20, callbacks=[...], logger=...),
             monitor="val_wer", datamodule=dm)

The plan's model is the user's ``LightningModule`` (its blocks are named submodules); the plan
re-initialises and freezes blocks before each stage and decides acceptance in
``stage.finish``, so the run directory is the command line's. Every stage gets a fresh
``Trainer`` from the user's factory (a trainer's loops, optimizers and callback state belong to
one fit), with our ``PlanCallback`` added to it.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from topdown.errors import ConfigError, TrainingError
from topdown.plan import Plan
from topdown.stage import Stage

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        'topdown.adapters.lightning needs PyTorch Lightning: pip install "topdown[lightning]"'
    ) from e


class PlanCallback(pl.Callback):
    """What a stage needs from inside Lightning's fit: frozen blocks kept frozen, epochs logged.

    The plan froze the blocks (``requires_grad=False``, modules pinned to eval mode), but
    Lightning builds the optimizer from the user's ``configure_optimizers`` and sets training
    modes itself (after validation it restores the modes it captured by assigning
    ``module.training``, which bypasses the plan's pin). So: refuse an optimizer that holds a
    frozen parameter, and put the modules that were in eval mode when the stage started back in
    eval mode before every training batch, so that frozen BatchNorm statistics never move
    (Lightning's own ``BaseFinetuning.freeze_module`` leaves BatchNorm in training mode).
    Each epoch goes to ``metrics.jsonl`` as our loop writes it (the report's curves read it).
    """

    def __init__(self, stage: Stage, eval_modules: list[nn.Module], monitor: str):
        self.stage, self.eval_modules, self.monitor = stage, eval_modules, monitor
        self.started, self.validated, self.losses = time.perf_counter(), False, []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the processes exist now (the ddp strategy starts them in fit): a run resumed with another
        # number is refused before it trains
        self.stage.plan.record.agree()
        frozen = {id(p) for p in pl_module.parameters() if not p.requires_grad}
        for opt in trainer.optimizers:
            if any(id(p) in frozen for group in opt.param_groups for p in group["params"]):
                raise ConfigError(
                    f"{self.stage.describe()}: configure_optimizers gave the optimizer a frozen parameter; "
                    "build it from the parameters that require grad, e.g. "
                    "filter(lambda p: p.requires_grad, self.parameters())"
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for m in self.eval_modules:
            m.training = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validated = self.validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation has ended by now, and what the module logs in its own on_validation_epoch_end is in
        if (
            self.validated
        ):  # a misnamed monitor is said after the first epoch, not after the stage's whole fit
            _check_monitor(self.stage, trainer.callback_metrics, self.monitor)
        val = (
            _renamed(trainer.callback_metrics, self.monitor, self.stage.plan.metric.name, validation=True)
            if self.validated
            else {}
        )
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        loss = torch.stack(self.losses).float().mean().item() if self.losses else None
        self.stage.log(
            {
                "epoch": trainer.current_epoch + 1,
                "lr": lr,
                "train_loss": loss,
                "val": val,
                "seconds": time.perf_counter() - self.started,
            }
        )
        self.validated, self.losses = False, []


def fit_plan(
    plan: Plan,
    trainer_factory: Callable[[Stage], pl.Trainer],
    *,
    monitor: str,
    test_monitor: str | None = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    test_dataloaders: Any = None,
    datamodule: Any = None,
) -> dict[str, Any]:
    """Run every stage of ``plan`` as one ``Trainer.fit`` of ``plan.model``; returns the run summary.

    ``trainer_factory(stage)`` returns a new ``lightning.Trainer`` for the stage (your callbacks,
    loggers, precision, epochs; ``stage.index`` and ``stage.trained_blocks`` say which stage).
    ``monitor``: the name your ``validation_step`` logs the plan's metric under (``"val_wer"``
    for ``metric="wer"``). After fit, ``trainer.validate`` on the final weights gives the
    stage's validation metrics: ``monitor`` becomes the plan's metric name and other logged
    names lose the same prefix (``val_loss`` -> ``loss``). If test data is given (or your
    datamodule or module defines ``test_dataloader``), ``trainer.test`` gives the reported test
    metrics the same way, the metric read from ``test_monitor`` (default: ``monitor`` with
    its ``val``/``valid``/``validation`` prefix replaced by ``test``). The data arguments are
    passed to ``fit``/``validate``/``test`` as Lightning takes them, or may be functions of the
    stage (``stage -> dataloader``); a transfer-classifier stage trains on the first
    ``stage.subset`` of the training data, so its training data must be such a function.

    Each stage is seeded with ``stage.seed`` (a resumed run repeats an interrupted stage
    exactly); stages that train nothing (a ``from_checkpoint`` model) are only evaluated.
    ``configure_optimizers`` must build its optimizer from the parameters that require grad;
    an optimizer holding a frozen parameter is refused (``ConfigError``), and the run is then
    marked failed and can be continued with ``resume=True`` once fixed.
    """
    metric = plan.metric.name
    if test_monitor is None:
        test_monitor = default_test_monitor(monitor)
    subset_ok = callable(train_dataloaders) or callable(datamodule)
    try:
        if (
            plan.procedure == "transfer-classifier" and not subset_ok
        ):  # before the full-data baseline is trained
            raise ConfigError(
                "transfer-classifier trains stages on a subset of the training data: pass train_dataloaders "
                "(or datamodule) as a function of the stage that returns its first stage.subset"
            )
        for stage in plan:
            if stage.trained_blocks and stage.subset < 1 and not subset_ok:  # another plan with subsets
                raise ConfigError(
                    f"{stage.describe()} trains on the first {stage.subset:g} of the training data: pass "
                    "train_dataloaders (or datamodule) as a function of the stage that returns that subset"
                )
            data = {
                k: v(stage) if callable(v) else v
                for k, v in dict(
                    train=train_dataloaders, val=val_dataloaders, test=test_dataloaders, dm=datamodule
                ).items()
            }
            trainer = trainer_factory(stage)
            pl.seed_everything(stage.seed % 2**32, workers=True)  # numpy's seeds are 32-bit
            model = stage.model
            if stage.trained_blocks:
                # Lightning keeps the modes it finds; the plan's frozen modules stay in eval mode
                model.train()
                trainer.callbacks.append(
                    PlanCallback(stage, [m for m in model.modules() if not m.training], monitor)
                )
                with warnings.catch_warnings():  # frozen blocks are in eval mode on purpose
                    warnings.filterwarnings(
                        "ignore", message=r".*module\(s\) in eval mode at the start of training"
                    )
                    trainer.fit(
                        model,
                        train_dataloaders=data["train"],
                        val_dataloaders=data["val"],
                        datamodule=data["dm"],
                    )
                if trainer.interrupted:
                    raise TrainingError(
                        f"{stage.describe()} was interrupted; continue the run with resume=True"
                    )
            logged = _merged(
                trainer.validate(model, dataloaders=data["val"], datamodule=data["dm"], verbose=False)
            )
            _check_monitor(stage, logged, monitor)
            val = _renamed(logged, monitor, metric, validation=True)
            test = {}
            if (
                data["test"] is not None
                or is_overridden("test_dataloader", data["dm"])
                or is_overridden("test_dataloader", model)
            ):
                test = _renamed(
                    _merged(
                        trainer.test(model, dataloaders=data["test"], datamodule=data["dm"], verbose=False)
                    ),
                    test_monitor,
                    metric,
                    validation=False,
                )
            stage.finish(val=val, test=test, epochs=trainer.current_epoch if stage.trained_blocks else 0)
    except Exception:  # any error, the user's code included: on record, and the run's lock released
        plan.fail()
        raise
    return plan.summary


def default_test_monitor(monitor: str) -> str | None:
    """The test name of a validation metric: ``val_wer``, ``valid/wer`` or ``validation.wer`` ->
    ``test_wer``, ``test/wer``, ``test.wer``; None for a name without such a prefix."""
    test = re.sub(r"^val(id(ation)?)?(?=[_/.\-])", "test", monitor)
    return test if test != monitor else None


def _merged(results: list[Mapping[str, float]]) -> dict[str, float]:
    return {k: v for r in results for k, v in r.items()}  # one dict per dataloader


def _check_monitor(stage: Stage, logged: Mapping[str, Any], monitor: str) -> None:
    if monitor not in logged:
        names = sorted(k for k in logged if k.startswith("val")) or sorted(
            logged
        )  # callback_metrics also hold training metrics
        raise ConfigError(
            f"{stage.describe()}: validation logged {names}, not {monitor!r}; "
            f"log it in validation_step (self.log({monitor!r}, ...)) or pass monitor="
        )


def _renamed(logged: Mapping[str, Any], key: str | None, metric: str, validation: bool) -> dict[str, float]:
    """Logged metrics under the plan's names: ``key`` (``val_wer``) becomes ``metric`` (``wer``)
    and the names with the same prefix lose it (``val_loss`` -> ``loss``). Of validation, only
    those (``callback_metrics`` also holds training metrics); of testing, all."""
    if (
        not validation and key is not None and logged and key not in logged
    ):  # else the report's test column is silently empty
        raise ConfigError(
            f"the test metrics logged ({', '.join(sorted(logged))}) lack {key!r}: log it in test_step, "
            "or name the logged one with test_monitor="
        )
    prefix = key[: -len(metric)] if key and key.endswith(metric) else None
    out = {}
    for k, v in logged.items():
        if prefix and k.startswith(prefix):
            out[k[len(prefix) :]] = float(v)
        elif not validation and k != key:
            out[k] = float(v)
    if key in logged:
        out[metric] = float(logged[key])
    return out
