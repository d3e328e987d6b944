"""A procedure as a plan of stages that any training loop can drive.

    plan = topdown.Cascade(model, blocks, build_model=build, metric="wer", out="runs/x")
    for stage in plan:                      # stage 0 = baseline, then one per split, top-down
        opt = make_optimizer(stage.trainable_parameters())
        my_training(stage.model, opt)       # any loop, schedule, logging, precision
        stage.finish(val={"wer": my_validation(stage.model)})   # accepted or rejected here

The plan is the method; the loop is not. Before it hands a stage out, the plan loads the
weights the stage starts from, re-initialises the blocks it trains (by copying them from a
model freshly built with the stage's seed, so the model's own init scheme is kept), or applies
the stage's own resets (``resets.py``: shrink and perturb, rescale, a KELS split), and
freezes the others (no gradients, eval-mode normalisation). ``finish`` decides acceptance on
validation (``Accept``) and hands the stage to the plan's record (``record.py``): a run
directory given as ``out`` (checkpoints, summary, report; ``resume=True`` skips the stages it
finished and hands out the next one), or, without ``out``, memory only: nothing is written.
Our own loop (``procedures.train_plan``) is one executor of the same plans.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from topdown import distributed
from topdown.adopt import AdoptedStage, adoptable_stage_zero
from topdown.blocks import Blocks, BlockSpec, empty_side, usable_splits
from topdown.config import RunConfig
from topdown.console import say, warn
from topdown.devices import host_copy
from topdown.errors import ConfigError, TopdownError
from topdown.files import weights_digest
from topdown.identity import first_difference, run_identity
from topdown.metrics import Metric
from topdown.pretrained import check_start, load_start
from topdown.provenance import provenance
from topdown.record import Record, RunRecord
from topdown.resets import Reinit, ResetContext
from topdown.seeds import check_seed, derive_seed
from topdown.stage import Accept, Stage, StageSpec
from topdown.tracking import Tracking


def cascade_splits(config: RunConfig, blocks: Blocks) -> list[int]:
    """``cascade.splits``, or every split L-1..1 with a parameter on each side (extractor, classifier)."""
    if config.cascade.splits is not None:
        return config.cascade.splits
    if not (splits := usable_splits(blocks.parameter_names())):
        raise ConfigError(
            f"no split of the blocks {blocks.names} has a parameter on both sides (feature extractor and "
            "classifier): declare more blocks"
        )
    return splits


class Plan:
    """A procedure's stages over one model (see the module docstring).

    ``blocks``: a ``Blocks`` or a block spec. ``build_model()`` returns a freshly initialised
    model of the same shape (re-initialising a block copies it from one, tensor by tensor, so one
    built on the CPU costs an accelerator nothing beyond the plan's model). ``metric``: the
    validation metric that decides; its direction comes from ``lower_is_better`` or its name.
    ``out``: the run directory the plan records into (None: in memory, nothing written);
    ``resume``: continue the run there. ``from_checkpoint``: stage 0 loads this model instead of
    training a baseline. ``baseline_from``: a run directory whose finished stage 0 is this plan's
    own (``adopt``: a comparison's arms start from its baseline's model), taken instead of training
    it again where it is the same training. ``track``: trackers that also get the run directory's
    epochs and stages (``"tensorboard"``, ``"mlflow"``, both, or a ``topdown.Tracking`` with an
    MLflow URI; see ``tracking``). ``summary`` is the run record (``summary.json``'s content).
    """

    procedure: ClassVar[str] = "custom"
    # a control plan (as ``restarts``): in a comparison, every other arm is also measured against it
    control: ClassVar[bool] = False
    # the ``procedure.*`` options the plan reads; any other one set is refused rather than ignored
    # (None: not declared, nothing refused, as for a plan of the user's own)
    procedure_options: ClassVar[tuple[str, ...] | None] = None

    def __init__(
        self,
        model: nn.Module,
        blocks: Blocks | BlockSpec,
        *,
        build_model: Callable[[], nn.Module],
        out: str | Path | None = None,
        metric: str,
        lower_is_better: bool | None = None,
        config: RunConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        shared: Mapping[str, str] | None = None,
        resume: bool = False,
        name: str = "custom",
        preset: str | None = None,
        task_info: Mapping[str, Any] | None = None,
        from_checkpoint: str | None = None,
        baseline_from: str | Path | None = None,
        track: Tracking | str | Sequence[str] | None = None,
    ):
        if isinstance(build_model, nn.Module) or not callable(build_model):
            raise ConfigError(
                f"build_model must be a function that returns a freshly built model (e.g. lambda: MyNet()), "
                f"got {type(build_model).__name__}"
            )
        self.model, self.build_model, self.seed, self.from_checkpoint = (
            model,
            build_model,
            check_seed(seed),
            from_checkpoint,
        )
        self.baseline_from, self._out = baseline_from, None if out is None else Path(out)
        if isinstance(blocks, Blocks):
            if blocks.model is not model:
                raise ConfigError(
                    "the Blocks given were declared over another model than the plan's: declare them over "
                    "this model, or pass the block spec itself"
                )
            if shared:
                raise ConfigError(
                    "shared= is for a block spec; a Blocks already has its owners of shared parameters "
                    "(Blocks(model, spec, shared))"
                )
            self.blocks = blocks
        else:
            self.blocks = Blocks(model, blocks, shared)
        self.metric = Metric.named(metric, lower_is_better)
        self.config = RunConfig.from_dict(config) if isinstance(config, Mapping) else config or RunConfig()
        self.task_info = dict(task_info or {})
        self._refuse_unused_procedure_options()
        self.check()
        if (tracking := Tracking.of(track)).to and out is None:
            raise ConfigError(
                f"track={list(tracking.to)} logs a run directory's records: give the plan one (out=...)"
            )
        if from_checkpoint is not None and (not resume or Path(from_checkpoint).exists()):
            check_start(from_checkpoint)  # before anything is written (a resume may not need it)
        self.record = RunRecord(out, tracking) if out is not None else Record()
        self._identity = run_identity(
            self.procedure, name, preset, seed, self.config, self.metric, self.task_info
        )
        header = {
            **self._identity,
            "blocks": self.blocks.parameter_names(),
            "provenance": provenance(next(model.parameters()).device),
        }
        self.record.open(header, resume, self.config.option_defaults, from_checkpoint)
        # once nothing can refuse the plan: a refused plan leaves no hook on the model
        self.blocks.watch_call_order()
        self._tried: list[dict[str, Any]] = []
        # the stage's best candidate so far: its results (seed, epochs, val), test metrics, weights
        self._best: tuple[dict[str, Any], dict[str, float], dict[str, torch.Tensor]] | None = None

    # -- what a procedure defines -------------------------------------------------------

    def stages(self) -> Iterator[StageSpec]:
        """Yield the stages in order; each ``yield`` returns the finished stage's record."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse options that cannot work, before anything is written (override to add)."""

    def _refuse_unused_procedure_options(self) -> None:
        if self.procedure_options is None:
            return
        given = {k: v for k, v in self.config.as_dict()["procedure"].items() if v is not None}
        if unused := [f"procedure.{k}" for k in given if k not in self.procedure_options]:
            uses = ", ".join(f"procedure.{k}" for k in self.procedure_options) or "no procedure.* option"
            hint = (
                "; a cascade's splits are cascade.splits"
                if self.procedure == "cascade" and "split" in given
                else ""
            )
            raise ConfigError(f"{self.procedure} does not use {', '.join(unused)} (it uses {uses}){hint}")

    # -- helpers for procedures ----------------------------------------------------------

    @property
    def summary(self) -> dict[str, Any]:
        """The run record: identity, provenance, a record per finished stage, the chosen stage."""
        return self.record.summary

    @property
    def best_index(self) -> int | None:
        return self.summary["chosen_stage"]

    def all_blocks(self) -> tuple[str, ...]:
        return tuple(self.blocks.names)

    def rounds(self) -> int:
        """For a plan of rounds (generations): ``procedure.rounds``, or as many as the cascade has
        stages after its baseline, so that the plan spends the cascade's budget."""
        return self.config.procedure.rounds or len(cascade_splits(self.config, self.blocks))

    def check_split(self, k: int | None, what: str) -> None:
        """A split whose feature extractor and classifier each own a parameter (``blocks.empty_side``)."""
        if k is None:
            raise ConfigError(
                f"{what} needs a split K in 1..{len(self.blocks) - 1} (procedure.split; --split K)"
            )
        if reason := self.blocks.out_of_range(k):
            raise ConfigError(reason)
        if (empty := empty_side(self.blocks.parameter_names(), k)) is not None:
            side, blocks = empty
            names = " and ".join(blocks) + (" blocks, which own" if len(blocks) > 1 else " block, which owns")
            hint = " (a tied weight belongs to a block above)" if side == "feature extractor" else ""
            raise ConfigError(
                f"split {k}: the {side} is only the {names} no parameter{hint}; choose another split"
            )

    def stage_zero(self, role: str = "baseline", accept: Accept | str = Accept.ALWAYS) -> StageSpec:
        """The trained baseline, or the ``from_checkpoint`` model (evaluated, not trained)."""
        if self.from_checkpoint is not None:
            return StageSpec(
                "loaded" if role == "baseline" else role,
                (),
                accept=accept,
                reinit=False,
                source=self.from_checkpoint,
            )
        return StageSpec(role, self.all_blocks(), accept=accept, train=self.config.train)

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Stage]:
        done = self.summary["stages"]
        specs = self.stages()
        record, index = None, 0
        while True:
            try:
                spec = specs.send(record) if index else next(specs)
            except StopIteration:
                break
            if index < len(done):  # finished before a resume
                record = done[index]
            elif index == 0 and (adopted := self._adoptable(spec)) is not None:
                record = self._adopt(spec, adopted)
            else:
                self._tried, self._best = [], None
                for c in range(spec.candidates):
                    if (saved := self.record.saved_candidate(index, c)) is not None:
                        self._keep_candidate(*saved)
                        continue
                    stage = self._prepare(index, c, spec)
                    yield stage
                    if not stage.finished:
                        raise TopdownError(
                            f"{stage.describe()} was not finished: call stage.finish(val=...) before "
                            "asking for the next stage"
                        )
                record = self.summary["stages"][index]
            index += 1
        self._complete()

    def _adoptable(self, spec: StageSpec) -> AdoptedStage | None:
        """``baseline_from``'s stage 0, where it is the one ``spec`` would train (``adopt``); a plan
        that reports derived models (``reported_models``) trains its own, to report them, and so does
        a run of several processes (each would decide alone, and the other run may finish between
        their decisions)."""
        trains_from_scratch = (
            spec.start is None
            and spec.source is None
            and spec.candidates == 1
            and spec.subset == 1.0
            and tuple(spec.trained) == self.all_blocks()
            and (spec.train is None or spec.train == self.config.train)
        )
        if (
            self.baseline_from is None
            or not trains_from_scratch
            or type(self).reported_models is not Plan.reported_models
            or distributed.world_size() > 1
        ):
            return None
        return adoptable_stage_zero(
            self.baseline_from, self._out, self._identity, self.config.option_defaults, self.all_blocks()
        )

    def _adopt(self, spec: StageSpec, adopted: AdoptedStage) -> dict[str, Any]:
        """Record stage 0 as ``adopted`` from another run: its epochs' metrics, then the stage."""
        say(f"stage 0 ({spec.role}): the model of {adopted.adopted_from}'s stage 0, not trained again")
        self.record.forget_metrics(0)  # of a stage 0 this run had begun itself before an interruption
        for line in adopted.metrics:
            self.record.log(line)
        self._tried, self._best = [], None
        self._keep_candidate(adopted.tried, adopted.test, adopted.seconds, adopted.weights)
        return self._record_stage(Stage(self, 0, 0, spec), adopted_from=adopted.adopted_from)

    def _prepare(self, index: int, candidate: int, spec: StageSpec) -> Stage:
        stage = Stage(self, index, candidate, spec)
        self.blocks.check_known([*spec.trained, *(spec.reinit_blocks or ()), *spec.reset_blocks()])
        self.blocks.unfreeze()
        if spec.source is not None:
            self._load(spec.source)
        elif spec.start is None:
            self.model.load_state_dict(self._fresh_model(stage.seed).state_dict())
        else:
            self.model.load_state_dict(self.record.stage_weights(spec.start))
            if resets := spec.resets():
                # the initial model first: the fresh one, built last, leaves torch's RNG where it always has
                initial = self.initial_model() if any(r.needs_initial for r in resets) else None
                context = ResetContext(self.model, self.blocks, self._fresh_model(stage.seed), initial)
                for reset in resets:
                    reset.apply(context)
        self.blocks.freeze(stage.frozen_blocks, frozen_dropout=self.config.cascade.frozen_dropout)
        stage._started = time.perf_counter()
        return stage

    def initial_model(self) -> nn.Module:
        """The model as first initialised: built again with the seed of stage 0's first candidate."""
        return self._fresh_model(derive_seed(self.seed, 0, 0))

    def _fresh_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        fresh = self.build_model()
        if not isinstance(fresh, nn.Module):
            raise ConfigError(
                f"build_model() must return a model like the plan's, got {type(fresh).__name__}"
            )
        ours, theirs = self.model.state_dict(), fresh.state_dict()
        for key, tensor in ours.items():
            if key not in theirs or theirs[key].shape != tensor.shape:
                got = f"{key} {tuple(theirs[key].shape)}" if key in theirs else f"no {key}"
                raise ConfigError(
                    f"build_model() must return a model like the plan's, with {key} "
                    f"{tuple(tensor.shape)}; got {got}"
                )
        return fresh

    def _load(self, path: str) -> None:
        tensors, meta = load_start(self.model, path)
        self._warn_if_other_data(Path(path), meta)
        self._source_weights = weights_digest(tensors)

    def _warn_if_other_data(self, path: Path, meta: Mapping[str, Any]) -> None:
        """A model trained on other data may have trained on this run's test set (another split,
        another corpus). That can be intended (pre-training elsewhere), so it is said, not refused."""
        differences = []
        if meta.get("task") not in (None, self.summary["task"]):
            differences.append(f"task {meta['task']!r}")
        if "task_info" in meta and (d := first_difference(meta, {"task_info": self.task_info})):
            differences.append(d)
        theirs, ours = meta.get("config") or {}, self.config.as_dict()
        if (
            "data" in theirs
            and "data" in ours
            and (d := first_difference(theirs, {"data": ours["data"]}, self.config.option_defaults))
        ):
            differences.append(f"config {d}")
        if differences:
            warn(
                f"checkpoint {path} was trained on other data than this run ({'; '.join(differences)} "
                "differ): this run's test numbers are held out only if that data left its test set out"
            )

    def reported_models(self) -> dict[str, nn.Module]:
        """Models derived from the weights a stage ends with that the plan reports beside the stage,
        by name (Knowledge Evolution's slim model): a loop evaluates each and hands the metrics to
        ``stage.finish(reported=...)``. They are recorded, never used to choose. None by default."""
        return {}

    # -- candidates and stages ------------------------------------------------------------

    def _candidate_finished(
        self,
        stage: Stage,
        val: dict[str, float],
        test: dict[str, float],
        epochs: int,
        seconds: float,
        kept_epoch: int | None,
        reported: dict[str, dict[str, dict[str, float]]],
    ) -> dict[str, Any] | None:
        tried = {"seed": stage.seed, "epochs": epochs, "val": val}
        if kept_epoch is not None:
            tried["kept_epoch"] = kept_epoch
        if reported:
            tried["reported"] = reported
        if stage.candidate < stage.spec.candidates - 1:
            # the next candidate trains over the model: this one's weights are kept on the host
            weights = host_copy(self.model)
            # a resumed run picks finished candidates up from here
            self.record.save_candidate(
                stage.index, stage.candidate, weights, {**tried, "test": test, "seconds": seconds}
            )
            self._keep_candidate(tried, test, seconds, weights)
            return None
        # the last candidate's weights are the model's own, recorded from there: no copy on its device
        self._keep_candidate(tried, test, seconds, self.model.state_dict())
        return self._record_stage(stage)

    def _keep_candidate(
        self, tried: dict[str, Any], test: dict[str, float], seconds: float, weights: dict[str, torch.Tensor]
    ) -> None:
        self._tried.append({**tried, "seconds": seconds})
        if self._best is None or self.metric.better(
            tried["val"][self.metric.name], self._best[0]["val"][self.metric.name]
        ):
            self._best = (tried, test, weights)

    def _record_stage(self, stage: Stage, adopted_from: str | None = None) -> dict[str, Any]:
        """Decide acceptance, then save checkpoints before the summary that points at them."""
        spec, (best, test, weights) = stage.spec, self._best
        val = best["val"]
        self.blocks.unfreeze()
        self.model.load_state_dict(weights)
        chosen = self.best_index
        best_val = self.summary["stages"][chosen]["val"][self.metric.name] if chosen is not None else None
        record = {
            "index": stage.index,
            "role": spec.role,
            "split": spec.split,
            "trained_blocks": list(spec.trained),
            "frozen_blocks": stage.frozen_blocks,
            "reinit": spec.source is None
            and (spec.start is None or any(isinstance(r, Reinit) for r in spec.resets())),
            "reset": [r.describe() for r in spec.resets()],
            "subset": spec.subset,
            "epochs": sum(t["epochs"] for t in self._tried),
            "candidates": []
            if spec.source
            else [{k: t[k] for k in ("seed", "epochs", "val")} for t in self._tried],
            "val": val,
            "test": test,
            "accepted": spec.accept.accepts(val[self.metric.name], best_val, self.metric),
            "seconds": sum(t["seconds"] for t in self._tried),
            **({"kept_epoch": best["kept_epoch"]} if "kept_epoch" in best else {}),
            **({"reported": best["reported"]} if "reported" in best else {}),
            **({"source": spec.source, "source_weights": self._source_weights} if spec.source else {}),
            **({"adopted_from": adopted_from} if adopted_from else {}),
            **(
                {"reinit_blocks": list(spec.reinit_blocks)}
                if spec.reinit_blocks is not None and spec.reinit
                else {}
            ),
        }
        meta = {
            "task": self.summary["task"],
            "stage": stage.index,
            "config": self.summary["config"],
            "task_info": self.task_info,
        }
        self.record.add_stage(record, weights, meta)
        self._best = None  # the record has the stage's weights
        return record

    # -- the end --------------------------------------------------------------------------

    def fail(self) -> None:
        """Record, if the disk still lets us, that the run stopped on an error (it can be resumed)."""
        self.record.fail()

    def _complete(self) -> None:
        """Mark the run complete (its record renders the report) and leave the chosen model in ``model``."""
        self.blocks.unfreeze()
        self.record.complete()
        if (chosen := self.record.chosen_weights()) is not None:
            self.model.load_state_dict(chosen)
