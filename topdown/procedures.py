"""The four procedures (docs/method.md) as plans of stages, the registry of built-in plans (these,
later-layer forgetting and the schedules of ``schedules.py``), and our loop as their executor.

Each procedure is a ``Plan`` whose ``stages()`` yields what each stage does; the plan does
the method (re-initialise, freeze, accept, record). ``train_plan`` drives any plan with our
``fit``; a user's own loop drives the same plans (see ``plan.py``). ``run_procedure`` is the
entry point of the command line and of the ``baseline``/``cascade``/... functions (``shortcuts``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from topdown import distributed
from topdown.blocks import Blocks
from topdown.config import RunConfig
from topdown.console import progress_label, say
from topdown.devices import resolve_device
from topdown.errors import ConfigError, TopdownError, TrainingError
from topdown.identity import current_name, recorded_mismatch, run_identity
from topdown.loop import evaluate, fit, monitored_metric
from topdown.plan import Plan, cascade_splits
from topdown.report import format_metric
from topdown.runs import RunDir
from topdown.schedule import LrSchedule
from topdown.schedules import SCHEDULES
from topdown.seeds import check_seed, derive_seed
from topdown.stage import Accept, StageSpec
from topdown.task import Task
from topdown.tracking import Tracking


class Baseline(Plan):
    """Train all blocks jointly (stage 0 only)."""

    procedure = "baseline"
    procedure_options = ()

    def check(self) -> None:
        if self.from_checkpoint is not None:
            raise ConfigError(
                "baseline trains from scratch; a starting checkpoint (--from; from_checkpoint) is for "
                "the procedures that build on a trained model (cascade, forgetting, ...)"
            )

    def stages(self) -> Iterator[StageSpec]:
        yield self.stage_zero()


def planned_models(task: Task, config: RunConfig) -> int | None:
    """How many models a cascade of ``task`` trains (its baseline, then ``cascade.candidates`` per
    split), known before it runs; None with ``cascade.patience``, which can end it early."""
    if config.cascade.patience is not None:
        return None
    return (
        1
        + len(cascade_splits(config, Blocks(task.build_model(), task.blocks, task.shared)))
        * config.cascade.candidates
    )


class Cascade(Plan):
    """Top-down cascade: stage 0, then for each split (descending) a fresh feature extractor
    trained under the chosen model's frozen classifier, accepted only if better on validation."""

    procedure = "cascade"
    procedure_options = ()

    def splits(self) -> list[int]:
        return cascade_splits(self.config, self.blocks)

    def check(self) -> None:
        # descending is CascadeConfig's to check; the range and both sides' parameters, the model's
        for k in self.splits():
            self.check_split(k, "cascade.splits")

    def stages(self) -> Iterator[StageSpec]:
        cc, train = self.config.cascade, LrSchedule.stage_recipe(self.config)
        yield self.stage_zero()
        rejected_in_a_row = 0
        for k in self.splits():
            record = yield StageSpec(
                "cascade",
                tuple(self.blocks.split(k)[0]),
                start=self.best_index,
                reinit=cc.reinit,
                split=k,
                train=train,
                candidates=cc.candidates,
            )
            rejected_in_a_row = 0 if record["accepted"] else rejected_in_a_row + 1
            if cc.patience is not None and rejected_in_a_row >= cc.patience:
                break
        if cc.finetune_epochs > 0:
            yield StageSpec(
                "finetune",
                self.all_blocks(),
                start=self.best_index,
                reinit=False,
                train=LrSchedule.finetune_recipe(self.config),
            )


class RetrainClassifier(Plan):
    """From stage 0, freeze blocks 1..split and train fresh blocks above them."""

    procedure = "retrain-classifier"
    procedure_options = ("split",)

    def check(self) -> None:
        self.check_split(self.config.procedure.split, self.procedure)

    def stages(self) -> Iterator[StageSpec]:
        k = self.config.procedure.split
        yield self.stage_zero()
        yield StageSpec(
            self.procedure,
            tuple(self.blocks.split(k)[1]),
            start=0,
            split=k,
            train=LrSchedule.stage_recipe(self.config),
        )


class TransferClassifier(Plan):
    """The classifier of a full-data model, frozen, over a fresh feature extractor trained on a
    subset, against a baseline trained on the same subset."""

    procedure = "transfer-classifier"
    procedure_options = ("split", "subset")

    def check(self) -> None:
        self.check_split(self.config.procedure.split, self.procedure)
        if self.config.procedure.subset is None:
            raise ConfigError(
                "transfer-classifier needs a subset, a fraction in (0, 1) of the training data "
                "(procedure.subset; --subset)"
            )

    def stages(self) -> Iterator[StageSpec]:
        k, subset = self.config.procedure.split, self.config.procedure.subset
        yield self.stage_zero("full-data baseline", accept=Accept.NEVER)
        yield StageSpec(
            "subset baseline", self.all_blocks(), subset=subset, accept=Accept.ALWAYS, train=self.config.train
        )
        yield StageSpec(
            "transfer",
            tuple(self.blocks.split(k)[0]),
            start=0,
            split=k,
            subset=subset,
            train=LrSchedule.stage_recipe(self.config),
        )


class Forgetting(Plan):
    """A neighbour of the cascade, as its control: after the baseline, each round re-initialises
    the blocks above the split and trains every block, the lower ones on from where the last
    round left them (later-layer forgetting, Zhou et al., ICLR 2022). By default it forgets the
    cascade's first classifier, once per cascade split (the cascade's stages after its baseline),
    with the cascade's stage recipe: the same budget, where the cascade trains one candidate a
    stage with neither patience nor a fine-tune stage (docs/method.md). Validation chooses among
    the rounds, as it does among stages. docs/schedules.md lists where this differs from the source."""

    procedure = "forgetting"
    procedure_options = ("split", "rounds")

    def split(self) -> int:
        k = self.config.procedure.split
        return k if k is not None else cascade_splits(self.config, self.blocks)[0]

    def check(self) -> None:
        self.check_split(self.split(), self.procedure)

    def stages(self) -> Iterator[StageSpec]:
        k = self.split()
        yield self.stage_zero()
        for r in range(self.rounds()):  # round r + 1 starts from round r's model, accepted or not
            yield StageSpec(
                "forget",
                self.all_blocks(),
                start=r,
                reinit_blocks=tuple(self.blocks.split(k)[1]),
                split=k,
                train=LrSchedule.stage_recipe(self.config),
            )


LaterLayerForgetting = Forgetting  # its former name

PLANS: dict[str, type[Plan]] = {
    p.procedure: p for p in (Baseline, Cascade, RetrainClassifier, TransferClassifier, Forgetting, *SCHEDULES)
}


def plan_class(name: str) -> type[Plan]:
    """The plan ``name`` names: a built-in one (a key of ``PLANS``, or its former name) or
    ``module:Class``, a ``Plan`` subclass importable from the user's path (the working directory
    first, as ``python -m`` has it). The one reading of a plan's name, for ``run_procedure``, the
    command line and ``compare``'s arms."""
    if current_name(name) in PLANS:
        return PLANS[current_name(name)]
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute.isidentifier():
        raise ConfigError(
            f"unknown plan {name!r}: a built-in plan ({', '.join(PLANS)}) or module:Class, a topdown.Plan "
            "subclass of your own"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: not found, or failing as it is imported
        raise ConfigError(f"plan {name}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    cls = getattr(module, attribute, None)
    if cls is None:
        raise ConfigError(f"plan {name}: module {module_name} has no {attribute}")
    if not (isinstance(cls, type) and issubclass(cls, Plan)) or cls is Plan:
        raise ConfigError(f"plan {name}: {attribute} is not a subclass of topdown.Plan")
    return cls


def train_plan(plan: Plan, task: Task, device: torch.device) -> dict[str, Any]:
    """Our executor: every stage of ``plan`` trained by ``fit`` with the stage's recipe."""
    for stage in plan:
        epochs, seconds, kept_epoch = 0, 0.0, None
        if stage.trained_blocks:
            result = fit(
                stage.model,
                task,
                stage.train,
                seed=stage.seed,
                subset=stage.subset,
                resume_path=stage.resume_path,
                on_epoch=stage.log,
                desc=stage.describe(),
                device=device,
            )
            val, epochs, seconds, kept_epoch = result.val, result.epochs, result.seconds, result.kept_epoch
        else:
            val = evaluate(stage.model, task, "val")
        started = time.perf_counter()
        reported = {
            name: {"val": evaluate(model, task, "val"), "test": evaluate(model, task, "test")}
            for name, model in plan.reported_models().items()
        }
        stage.finish(
            val=val,
            test=evaluate(stage.model, task, "test"),
            epochs=epochs,
            seconds=seconds + time.perf_counter() - started,
            kept_epoch=kept_epoch,
            reported=reported,
        )
    return plan.summary


def run_procedure(
    procedure: str,
    task: Task,
    out: str | Path,
    *,
    config: RunConfig | dict[str, Any] | None = None,
    seed: int = 0,
    preset: str | None = None,
    resume: bool = False,
    from_checkpoint: str | None = None,
    baseline_from: str | Path | None = None,
    device: str | torch.device | None = None,
    track: Tracking | str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``procedure`` (a plan's name, ``plan_class``) on ``task`` into run directory ``out`` with
    our loop; returns the summary. ``baseline_from``: a run whose finished stage 0 this run's would
    repeat, taken instead (``adopt``). ``track``: trackers that also get its epochs and stages (``Plan``)."""
    plan_type = plan_class(procedure)
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(config or {})
    # a monitor the loop cannot rank is refused before the run directory is written
    monitored_metric(config.train, task)
    torch.manual_seed(derive_seed(check_seed(seed), 0, 0))
    model = task.build_model()
    # Default: where build_model put the model (a task's evaluate may hold its data there).
    device = distributed.setup(
        resolve_device(device) if device is not None else next(model.parameters()).device
    )
    model = model.to(device)
    plan = plan_type(
        model,
        task.blocks,
        build_model=task.build_model,
        out=out,
        metric=task.primary.name,
        lower_is_better=task.primary.lower_is_better,
        config=config,
        seed=seed,
        shared=task.shared,
        resume=resume,
        name=task.name,
        preset=preset,
        task_info=task.info,
        from_checkpoint=from_checkpoint,
        baseline_from=baseline_from,
        track=track,
    )
    try:
        return train_plan(plan, task, device)
    except torch.OutOfMemoryError as e:  # the user's to fix (a batch too large for the device), not our bug
        plan.fail()
        raise TrainingError(
            f"out of memory on {device} ({str(e).splitlines()[0][:160]}); a smaller data.batch_size or model "
            "fits, and --resume continues from the last saved epoch"
        ) from None
    except Exception:  # any error (a task's own code included): on record, and the run's lock released
        plan.fail()
        raise


def run_or_resume(
    procedure: str,
    task: Task,
    out: Path,
    *,
    config: RunConfig,
    seed: int = 0,
    preset: str | None = None,
    weights_needed: bool = True,
    **kw,
) -> dict[str, Any]:
    """The summary of the run in ``out``: read back if complete, otherwise run or resume it.

    Used by commands that are made of many runs (compare, analyse), so that an interrupted
    one continues without training any finished run again. A finished run is reused only if
    it was made by the same procedure, task, preset, seed, configuration and metric: anything else
    would silently mix two experiments; that includes the data it was trained on, as far as the
    task's ``info`` describes it (corpus, sizes, vocabulary, normalisation), and the weights a run
    built on ``from_checkpoint`` loaded. ``weights_needed=False``: the caller reads only the summary,
    so a finished run whose checkpoints were all deleted is reused (``RunDir.verify``)."""
    existing = RunDir(out).read_summary()
    if existing is not None and existing.get("status") == "complete":
        wanted = run_identity(
            plan_class(procedure).procedure, task.name, preset, seed, config, task.primary, task.info
        )
        if reason := recorded_mismatch(existing, wanted, config.option_defaults, kw.get("from_checkpoint")):
            raise TopdownError(
                f"cannot reuse {out}: {reason}; delete that run's directory to train it again, or choose "
                "another --out"
            )
        RunDir(out).verify(existing, weights_needed=weights_needed)
        return existing
    with progress_label(out.name):  # several runs may train at once (--jobs): every line names its run
        # a run that stopped on an error before saving anything starts afresh (Plan), e.g. after a
        # corrected --set
        resume = existing is not None and not RunDir(out).failed_before_saving(existing)
        say(f"{'resuming' if resume else 'starting'} {procedure} in {out}")
        summary = run_procedure(
            procedure, task, out, config=config, seed=seed, preset=preset, resume=resume, **kw
        )
        m, chosen = summary["metric"], summary["stages"][summary["chosen_stage"]]
        say(
            f"finished: stage {chosen['index']} chosen, val {m} {format_metric(chosen['val'][m], m)}, "
            f"test {m} {format_metric(chosen['test'].get(m), m)}"
        )
        return summary
