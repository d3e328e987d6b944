"""A procedure as a plan of stages that any training loop can drive.

    plan = topdown.Cascade(model, blocks, build_model=build, metric="wer", out="runs/x")
    for stage in plan:                      # stage 0 = baseline, then one per split, top-down
        opt = make_optimizer(stage.trainable_parameters())
        my_training(stage.model, opt)       # any loop, schedule, logging, precision
        stage.finish(val={"wer": my_validation(stage.model)})   # accepted or rejected here

The plan is the method; the loop is not. Before it hands a stage out, the plan loads the
weights the stage starts from, re-initialises the blocks it trains (by copying them from a
model freshly built with the stage's seed, so the model's own init scheme is kept) and
freezes the others (no gradients, eval-mode normalisation). ``finish`` decides acceptance on
validation (``accept``), writes the checkpoints and then the run record. A plan opened on a
run directory with ``resume=True`` skips the stages it finished and hands out the next one.
Our own loop (``procedures.train_plan``) is one executor of the same plans.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from topdown import distributed, report
from topdown.blocks import Blocks, BlockSpec, empty_side
from topdown.config import RunConfig, TrainConfig
from topdown.errors import ConfigError, TopdownError, warn
from topdown.metrics import Metric
from topdown.runs import (
    RunDir,
    file_digest,
    first_difference,
    load_tensors,
    provenance,
    stage_checkpoint,
    weights_digest,
)
from topdown.seeds import check_seed, derive_seed


@dataclass(frozen=True)
class StageSpec:
    """What one stage does; a plan's ``stages()`` yields these."""

    role: str  # baseline, cascade, finetune, retrain-classifier, ... (recorded as is)
    trained: tuple[str, ...]  # the blocks it trains; the others are frozen
    start: int | None = None  # the stage whose weights it starts from; None: a freshly built model
    reinit: bool = True  # re-initialise the trained blocks when starting from a stage
    # with reinit, re-initialise these blocks instead of the trained ones: e.g. forget the upper
    # blocks while every block trains (later-layer forgetting), a neighbour of the cascade
    reinit_blocks: tuple[str, ...] | None = None
    split: int | None = None
    subset: float = 1.0  # fraction of the training data (transfer-classifier)
    candidates: int = 1  # models trained (different seeds); the best on validation is the stage's
    accept: str = "better"  # better: replaces the chosen model only if better; always; never (a reference)
    train: TrainConfig | None = None  # the recipe, for executors that take one (ours)
    source: str | None = None  # a checkpoint the stage loads (``--from``); it then trains nothing


def accept(rule: str, val: float, best: float | None, metric: Metric) -> bool:
    """Does a finished stage replace the chosen model? The cascade's one decision."""
    if rule == "always":
        return True
    if rule == "never":
        return False
    return metric.better(val, best)


def run_identity(
    procedure: str,
    name: str,
    preset: str | None,
    seed: int,
    config: RunConfig,
    metric: Metric,
    task_info: Mapping[str, Any],
) -> dict[str, Any]:
    """What identifies a run: a resumed run (``Plan``) or a reused one (``run_or_resume``) must match
    it exactly; ``task_info`` describes the data it trains on, ``metric`` what accepts its stages."""
    return {
        "procedure": procedure,
        "task": name,
        "preset": preset,
        "seed": seed,
        "config": config.as_dict(),
        "metric": metric.name,
        "lower_is_better": metric.lower_is_better,
        "task_info": dict(task_info),
    }


def other_start(summary: Mapping[str, Any], from_checkpoint: str | None) -> str | None:
    """Why the recorded run did not start from ``from_checkpoint``'s weights, or None if it did
    (or recorded none: runs made before ``source_weights`` existed). A run built on a checkpoint
    that was trained again since must not be continued or reused as if it were built on the new one,
    nor a run that trained its own baseline as if it were built on a checkpoint."""
    stages = summary.get("stages") or []
    if from_checkpoint is None or not stages:
        return None
    if "source" not in stages[0]:
        return f"it trained its own baseline, not the model in {from_checkpoint}"
    recorded = stages[0].get("source_weights")
    if recorded is None or not Path(from_checkpoint).is_file():
        return None  # nothing to compare (a resume no longer needs the checkpoint once stage 0 is recorded)
    if recorded == weights_digest(load_tensors(Path(from_checkpoint))[0]):
        return None
    return f"it started from other weights than {from_checkpoint} (was that checkpoint trained again since?)"


def recorded_mismatch(
    summary: Mapping[str, Any],
    identity: Mapping[str, Any],
    option_defaults: Mapping[str, Any],
    from_checkpoint: str | None,
) -> str | None:
    """Why the run recorded in ``summary`` is not the one ``identity`` and ``from_checkpoint``
    describe (so it may be neither continued nor reused), or None."""
    if difference := first_difference(summary, identity, {"config": option_defaults}):
        return f"its {difference} differs from this command's"
    return other_start(summary, from_checkpoint)


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON numbers: numbers, one-element tensors and numpy scalars become floats; NaN and
    infinities, which strict JSON cannot hold, become None. Nested dicts (``val``) likewise; a tensor
    or array of several values is refused (a record holds numbers); other values unchanged."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            value = _numbers(value)
        elif hasattr(value, "item") and hasattr(value, "dtype"):  # a torch tensor, a numpy array or scalar
            size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", 1)
            if size != 1:
                raise ConfigError(
                    f"metric {key!r} is a tensor or array of {size} values; a stage records numbers (log one value per key)"
                )
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's val or test metrics: ``_numbers``, and every number a float (as our loop gives them)."""
    return {
        k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        for k, v in _numbers(values).items()
    }


class Stage:
    """One candidate of one stage, handed to the training loop: train ``model``'s trainable
    parameters, then call ``finish`` with the validation metrics."""

    def __init__(self, plan: Plan, index: int, candidate: int, spec: StageSpec):
        self.plan, self.index, self.candidate, self.spec = plan, index, candidate, spec
        self.seed = derive_seed(plan.seed, index, candidate)
        self.record: dict[str, Any] | None = None  # the stage record, once its last candidate finished
        self.finished = False

    model = property(lambda self: self.plan.model)
    role = property(lambda self: self.spec.role)
    split = property(lambda self: self.spec.split)
    subset = property(lambda self: self.spec.subset)
    train = property(lambda self: self.spec.train or self.plan.config.train)
    trained_blocks = property(lambda self: list(self.spec.trained))
    frozen_blocks = property(lambda self: [b for b in self.plan.blocks.names if b not in self.spec.trained])
    accepted = property(lambda self: None if self.record is None else self.record["accepted"])

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters this stage trains: give these, and only these, to the optimizer."""
        return [p for _, p in self.named_trainable_parameters()]

    @property
    def resume_path(self) -> Path:
        """Where a loop that can resume mid-stage keeps this candidate's resume point."""
        return self.plan.run.state_file(self.index, self.candidate)

    def describe(self) -> str:
        n = self.spec.candidates
        return f"stage {self.index} ({self.role}{'' if n == 1 else f', candidate {self.candidate + 1}/{n}'})"

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's metrics (``epoch``, ``val``, ``train_loss``, ...) to ``metrics.jsonl``.

        ``epoch`` (an int) and ``val`` (a dict of validation metrics) are required: resume and the
        report read them. Tensors are stored as numbers."""
        record = _numbers(record)
        epoch, val = record.get("epoch"), record.get("val")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not isinstance(val, Mapping):
            raise ConfigError(
                f"{self.describe()}: stage.log needs 'epoch' (an int) and 'val' (a dict of validation "
                f"metrics), got {{'epoch': {epoch!r}, 'val': {val!r}}}"
            )
        self.plan.run.log_metrics({"stage": self.index, "candidate": self.candidate, **record})

    def finish(
        self,
        val: Mapping[str, float],
        test: Mapping[str, float] | None = None,
        epochs: int = 0,
        seconds: float | None = None,
        kept_epoch: int | None = None,
    ) -> dict[str, Any] | None:
        """Hand back the model's validation metrics (and, to report, test metrics; and the epoch
        whose weights the model holds, if one does). After the stage's last candidate this decides
        acceptance and records the stage; returns its record."""
        if self.finished:
            raise TopdownError(f"{self.describe()} is already finished")
        metric = self.plan.metric.name
        val, test = distributed.same_on_every_rank((_metrics(val), _metrics(test or {})))  # rank 0's decide
        for split, values in (("validation", val), ("test", test)):
            if (
                values or split == "validation"
            ) and metric not in values:  # the test metrics are optional, not partial
                raise ConfigError(
                    f"{self.describe()}: the {split} metrics {sorted(values)} lack the plan's metric {metric!r}"
                )
        if (
            val[metric] is None
        ):  # _metrics' NaN or infinity: a NaN would win no comparison, and an infinity could be chosen
            raise TopdownError(
                f"{self.describe()}: validation {metric} is NaN or infinite: the stage diverged; "
                "it was not recorded (the stages before it are saved)"
            )
        if not isinstance(val[metric], float):  # _metrics made every other number a float
            raise ConfigError(f"{self.describe()}: validation {metric} must be a number, got {val[metric]!r}")
        seconds = time.perf_counter() - self._started if seconds is None else seconds
        self.finished = True
        self.record = self.plan._candidate_finished(self, val, test, epochs, seconds, kept_epoch)
        return self.record


class Plan:
    """A procedure's stages over one model and run directory (see the module docstring).

    ``blocks``: a ``Blocks`` or a block spec. ``build_model()`` returns a freshly initialised
    model of the same shape (re-initialising a block copies it from one). ``metric``: the
    validation metric that decides; its direction comes from ``lower_is_better`` or its name.
    ``from_checkpoint``: stage 0 loads this model instead of training a baseline.
    """

    procedure: ClassVar[str] = "custom"
    # the ``procedure.*`` options the plan reads; any other one set is refused rather than ignored
    # (None: not declared, nothing refused, as for a plan of the user's own)
    procedure_options: ClassVar[tuple[str, ...] | None] = None

    def __init__(
        self,
        model: nn.Module,
        blocks: Blocks | BlockSpec,
        *,
        build_model: Callable[[], nn.Module],
        out: str | Path,
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
        if isinstance(blocks, Blocks):
            if blocks.model is not model:
                raise ConfigError(
                    "the Blocks given were declared over another model than the plan's: declare them over this model, "
                    "or pass the block spec itself"
                )
            if shared:
                raise ConfigError(
                    "shared= is for a block spec; a Blocks already has its owners of shared parameters (Blocks(model, spec, shared))"
                )
            self.blocks = blocks
        else:
            self.blocks = Blocks(model, blocks, shared)
        self.metric = Metric.named(metric, lower_is_better)
        self.config = RunConfig.from_dict(config) if isinstance(config, Mapping) else config or RunConfig()
        self.task_info = dict(task_info or {})
        self._refuse_unused_procedure_options()
        self.check()
        self.run = RunDir(out, writer=distributed.is_writer())
        header = {
            **run_identity(self.procedure, name, preset, seed, self.config, self.metric, self.task_info),
            "blocks": self.blocks.parameter_names(),
            "provenance": provenance(next(model.parameters()).device),
        }
        self.summary = self._open(header, resume)
        self.blocks.watch_call_order()  # once nothing can refuse the plan: a refused plan leaves no hook on the model
        self._tried: list[dict[str, Any]] = []
        self._best: tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor], int | None] | None = (
            None
        )

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
    def best_index(self) -> int | None:
        return self.summary["chosen_stage"]

    def all_blocks(self) -> tuple[str, ...]:
        return tuple(self.blocks.names)

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

    def stage_zero(self, role: str = "baseline", accept: str = "always") -> StageSpec:
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
            else:
                self._tried, self._best = [], None
                for c in range(spec.candidates):
                    if (saved := self._saved_candidate(index, c)) is not None:
                        self._keep_candidate(*saved)
                        continue
                    stage = self._prepare(index, c, spec)
                    yield stage
                    if not stage.finished:
                        raise TopdownError(
                            f"{stage.describe()} was not finished: call stage.finish(val=...) before asking for the next stage"
                        )
                record = self.summary["stages"][index]
            index += 1
        self._complete()

    def _prepare(self, index: int, candidate: int, spec: StageSpec) -> Stage:
        stage = Stage(self, index, candidate, spec)
        self.blocks.check_known([*spec.trained, *(spec.reinit_blocks or ())])
        self.blocks.unfreeze()
        if spec.source is not None:
            self._load(spec.source)
        elif spec.start is None:
            self.model.load_state_dict(self._fresh_model(stage.seed).state_dict())
        else:
            self.model.load_state_dict(self.run.load_model(stage_checkpoint(spec.start)))
            if spec.reinit:
                self.blocks.copy_blocks(
                    self._fresh_model(stage.seed),
                    spec.trained if spec.reinit_blocks is None else spec.reinit_blocks,
                )
        self.blocks.freeze(stage.frozen_blocks, frozen_dropout=self.config.cascade.frozen_dropout)
        stage._started = time.perf_counter()
        return stage

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
                    f"build_model() must return a model like the plan's, with {key} {tuple(tensor.shape)}; got {got}"
                )
        return fresh

    def _load(self, path: str) -> None:
        path = Path(path)
        if (owner := RunDir.of_checkpoint(path)) and (recorded := owner.read_summary()):
            wanted = (recorded.get("checksums") or {}).get(path.stem)
            if wanted is not None and file_digest(path) != wanted:
                raise TopdownError(
                    f"checkpoint {path} is corrupt: it does not match the checksum its run recorded in summary.json"
                )
        tensors, meta = load_tensors(path)
        try:
            self.model.load_state_dict(tensors)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ConfigError(
                f"checkpoint {path} does not fit this task's model: {' '.join(first[:3])[:300]}"
            ) from None
        self._warn_if_other_data(path, meta)
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
                f"checkpoint {path} was trained on other data than this run ({'; '.join(differences)} differ): this run's "
                "test numbers are held out only if that data left its test set out"
            )

    # -- candidates and stages ------------------------------------------------------------

    def _candidate_finished(
        self,
        stage: Stage,
        val: dict[str, float],
        test: dict[str, float],
        epochs: int,
        seconds: float,
        kept_epoch: int | None = None,
    ) -> dict[str, Any] | None:
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        tried = {"seed": stage.seed, "epochs": epochs, "val": val, "kept_epoch": kept_epoch}
        last = stage.candidate == stage.spec.candidates - 1
        if not last:  # a resumed run picks finished candidates up from here
            self.run.save_candidate(
                stage.index, stage.candidate, weights, {**tried, "test": test, "seconds": seconds}
            )
        self._keep_candidate(tried, test, seconds, weights)
        return self._record_stage(stage) if last else None

    def _saved_candidate(self, index: int, candidate: int):
        saved = self.run.load_candidate(index, candidate)
        if saved is None:
            return None
        weights, meta = saved
        tried = {k: meta[k] for k in ("seed", "epochs", "val")}
        return {**tried, "kept_epoch": meta.get("kept_epoch")}, meta["test"], meta["seconds"], weights

    def _keep_candidate(
        self, tried: dict[str, Any], test: dict[str, float], seconds: float, weights: dict[str, torch.Tensor]
    ) -> None:
        self._tried.append({**tried, "seconds": seconds})
        if self._best is None or self.metric.better(
            tried["val"][self.metric.name], self._best[0][self.metric.name]
        ):
            self._best = (tried["val"], test, weights, tried.get("kept_epoch"))

    def _record_stage(self, stage: Stage) -> dict[str, Any]:
        """Decide acceptance, then save checkpoints before the summary that points at them."""
        spec, (val, test, weights, kept_epoch) = stage.spec, self._best
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
            "reinit": spec.source is None and (spec.start is None or spec.reinit),
            "subset": spec.subset,
            "epochs": sum(t["epochs"] for t in self._tried),
            "candidates": []
            if spec.source
            else [{k: t[k] for k in ("seed", "epochs", "val")} for t in self._tried],
            "val": val,
            "test": test,
            "kept_epoch": kept_epoch,
            "accepted": accept(spec.accept, val[self.metric.name], best_val, self.metric),
            "seconds": sum(t["seconds"] for t in self._tried),
            **({"source": spec.source, "source_weights": self._source_weights} if spec.source else {}),
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
        checksums = self.summary.setdefault("checksums", {})
        checksums[stage_checkpoint(stage.index)] = self.run.save_model(
            stage_checkpoint(stage.index), weights, meta
        )
        if record["accepted"]:
            checksums["best"] = self.run.save_model("best", weights, meta)
            self.summary["chosen_stage"], self.summary["test"] = stage.index, test
        self.summary["stages"].append(record)
        self.run.write_summary(self.summary)
        self.run.clear_state(stage.index)
        distributed.barrier()  # the next stage may start from this stage's checkpoint, on every rank
        return record

    # -- the run record -------------------------------------------------------------------

    def _open(self, header: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Start a new run record, or continue the one in the directory (``resume``). Under DDP
        rank 0 decides, and every rank gets its record (or its error)."""
        outcome = None
        if self.run.writer:
            try:
                outcome = ("record", self._open_here(header, resume))
            except TopdownError as e:
                self.run.release()
                outcome = ("error", str(e))
        kind, value = distributed.same_on_every_rank(outcome)
        if kind == "error":
            raise TopdownError(value)
        return value

    def _open_here(self, header: dict[str, Any], resume: bool) -> dict[str, Any]:
        if self.run.path.exists() and not self.run.path.is_dir():
            raise TopdownError(
                f"{self.run.path} is a file, not a run directory; choose another output directory (--out)"
            )
        self.run.claim()
        existing = self.run.read_summary()
        failed_untrained = existing is not None and not resume and self.run.failed_before_saving(existing)
        if failed_untrained:
            warn(
                f"starting afresh in {self.run.path}: the run there stopped on an error before it saved any training"
            )
        if existing is None or failed_untrained:
            return self._start_record(header, resume, replaces_a_run=failed_untrained)
        if not resume:
            raise TopdownError(
                f"{self.run.path} already holds a run; resume it (--resume; resume=True) or choose another output directory"
            )
        return self._continue_record(existing, header)

    def _start_record(self, header: dict[str, Any], resume: bool, replaces_a_run: bool) -> dict[str, Any]:
        """A new run's first record, in a directory that is new, empty, holds only the debris of a
        first write, or (``replaces_a_run``) a run that stopped before it saved any training."""
        if resume:
            raise TopdownError(
                f"nothing to resume in {self.run.path} (no summary.json); start a run there without --resume (resume=False)"
            )
        if self.run.holds_only_debris():  # killed while writing its first summary: nothing was saved yet
            self._remove_debris()
        if not replaces_a_run and self.run.path.is_dir() and any(self.run.path.iterdir()):
            raise TopdownError(
                f"{self.run.path} is not empty and holds no run (no summary.json); choose another output directory (--out)"
            )
        summary = {**header, "status": "running", "stages": [], "chosen_stage": None, "test": None}
        self.run.write_summary(summary)
        self.run.claim()  # the directory exists now
        return summary

    def _continue_record(self, existing: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
        """The recorded run, to resume: refused if it is another run (identity, starting weights, number
        of processes); its checkpoints verified, and what a kill left half-written cleared."""
        identity = {
            k: v for k, v in header.items() if k != "provenance"
        }  # another machine may continue a run
        if reason := recorded_mismatch(existing, identity, self.config.option_defaults, self.from_checkpoint):
            raise TopdownError(f"cannot resume {self.run.path}: {reason}")
        for name in self.run.verify(existing):
            warn(
                f"restored {name}.safetensors from the chosen stage's checkpoint (a kill came between writing it and the record)"
            )
        self._remove_debris()
        finished = len(existing["stages"])
        if existing["status"] != "complete":
            last = (existing.get("resumed_on") or [existing.get("provenance", {})])[-1]
            if last.get("world_size", 1) != header["provenance"]["world_size"]:
                raise TopdownError(
                    f"cannot resume {self.run.path}: it was trained by {last.get('world_size', 1)} process(es) and this "
                    f"command has {header['provenance']['world_size']}; resume with the same number (--nproc)"
                )
            existing.setdefault("resumed_on", []).append(header["provenance"])
        for index in range(finished):
            self.run.clear_state(index)  # left behind if a kill came right after the stage was recorded
        self._drop_unsaved_metrics(finished)
        if existing["status"] != "complete":
            existing["status"] = "running"
            self.run.write_summary(
                existing
            )  # this continuation on record now, even if it ends before a stage does
        return existing

    def _remove_debris(self) -> None:
        for f in self.run.remove_debris():
            warn(f"removed {f}, left by an interrupted write")

    def _drop_unsaved_metrics(self, next_stage: int) -> None:
        """Forget metric lines of epochs that have no resume point (they will be run again)."""
        kept_epochs: dict[int, float] = {}
        for candidate, f in self.run.stage_state(next_stage):
            try:
                meta = load_tensors(f)[1]  # all of it: a torn file must not stop the run later
            except TopdownError as e:
                warn(
                    f"{e}; stage {next_stage} candidate {candidate} starts again (finished stages are intact)"
                )
                f.unlink()
                continue
            epoch = (
                meta["loop"]["epoch"] if "loop" in meta else float("inf")
            )  # a finished candidate keeps all its lines
            kept_epochs[candidate] = max(kept_epochs.get(candidate, 0), epoch)
        self.run.keep_metrics(
            lambda r: (
                r["stage"] < next_stage
                or (r["stage"] == next_stage and r["epoch"] <= kept_epochs.get(r["candidate"], 0))
            )
        )

    def fail(self) -> None:
        """Record, if the disk still lets us, that the run stopped on an error (it can be resumed)."""
        self.summary["status"] = "failed"
        try:
            self.run.write_summary(self.summary)
        except TopdownError:
            pass  # the error being raised says why; the last good record stays on disk
        self.run.release()

    def _complete(self) -> None:
        """Mark the run complete, render its report, and leave the chosen model in ``model``."""
        self.blocks.unfreeze()
        if self.summary["status"] != "complete":
            self.summary["status"] = "complete"
            self.run.write_summary(self.summary)
            if self.run.writer:
                report.write(self.run.path)
        self.run.release()
        best = self.run.checkpoint("best")
        if best.is_file():
            self.model.load_state_dict(load_tensors(best)[0])
