"""The four procedures of DESIGN.md section 2, on one engine that trains, records and resumes stages.

Each procedure is a short sequence of ``Runner.stage`` calls. A stage starts from
fresh weights or from an earlier stage's checkpoint, re-initialises the blocks it trains
(by copying them from a freshly built model with the stage's own seed), freezes the
rest, trains, and is then accepted or rejected on validation. The run directory records
each finished stage, so a resumed run skips finished stages and continues unfinished ones
from their last completed epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from . import report
from .blocks import Blocks
from .config import CascadeConfig, ProcedureConfig, TrainConfig, from_dict, merge, method_defaults
from .errors import ConfigError, TopdownError
from .loop import derive_seed, fit
from .runs import RunDir, load_tensors, read_metadata
from .task import Task

PROCEDURES = ("baseline", "cascade", "retrain-classifier", "transfer-classifier")


class Runner:
    """Shared machinery of the procedures: the model, its blocks, the run record."""

    def __init__(self, task: Task, config: dict[str, Any], run: RunDir, seed: int, device: torch.device):
        self.task, self.config, self.run, self.device, self.seed = task, config, run, device, seed
        self.train_cfg = from_dict(TrainConfig, config["train"])
        self.cascade_cfg = from_dict(CascadeConfig, config["cascade"])
        torch.manual_seed(derive_seed(self.seed, 0, 0))
        self.model = task.build_model().to(device)
        self.blocks = Blocks(self.model, task.blocks, task.shared)
        self.next_index = 0  # stages are numbered in the order the procedure asks for them

    def open(self, header: dict[str, Any], resume: bool) -> None:
        """Start a new run record, or continue the one in the directory (``--resume``)."""
        self.summary = self._read_or_start(header, resume)

    def _read_or_start(self, header: dict[str, Any], resume: bool) -> dict[str, Any]:
        existing = self.run.read_summary()
        header = {
            **header,
            "blocks": self.blocks.parameter_names(),
            "metric": self.task.metric,
            "lower_is_better": self.task.lower_is_better,
            "task_info": dict(self.task.info),
        }
        if existing is None:
            if self.run.path.is_dir() and any(self.run.path.iterdir()):
                raise TopdownError(f"{self.run.path} is not empty and holds no run (no summary.json); choose another --out")
            summary = {**header, "status": "running", "stages": [], "chosen_stage": None, "test": None}
            self.run.write_summary(summary)
            return summary
        if not resume:
            raise TopdownError(f"{self.run.path} already holds a run; pass --resume to continue it, or choose another --out")
        if difference := first_difference(existing, header):
            raise TopdownError(f"cannot resume {self.run.path}: its {difference} differs from this command's")
        for index in range(len(existing["stages"])):
            self.run.clear_state(index)  # left behind if a kill came right after the stage was recorded
        self._drop_unsaved_metrics(len(existing["stages"]))
        existing["status"] = "running"
        return existing

    def _drop_unsaved_metrics(self, next_stage: int) -> None:
        """Forget metric lines of epochs that have no resume point (they will be run again)."""
        saved = {}
        for f in self.run.state.glob(f"stage-{next_stage}-candidate-*.safetensors"):
            saved[int(f.stem.rsplit("-", 1)[1])] = read_metadata(f)["loop"]["epoch"]
        self.run.keep_metrics(
            lambda r: r["stage"] < next_stage or (r["stage"] == next_stage and r["epoch"] <= saved.get(r["candidate"], 0))
        )

    # -- stages ---------------------------------------------------------------------------

    @property
    def best_index(self) -> int:
        return self.summary["chosen_stage"]

    def _stage_seed(self, index: int, candidate: int) -> int:
        return derive_seed(self.seed, index, candidate)

    def _fresh_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.task.build_model()

    def stage(
        self,
        role: str,
        trained: Sequence[str],
        *,
        start: int | None,
        reinit: bool = True,
        split: int | None = None,
        train: TrainConfig | None = None,
        subset: float = 1.0,
        candidates: int = 1,
        accept: str = "better",
    ) -> dict[str, Any]:
        """Train one stage (or return it if a resumed run already finished it).

        ``start``: index of the stage whose weights to start from (None: fresh weights).
        ``accept``: "better" (replaces the current best only if better on validation),
        "always", or "never" (a reference model that never becomes the chosen one).
        """
        done = self._finished()
        if done is not None:
            return done
        index = self.next_index - 1
        train = train or self.train_cfg
        frozen = [b for b in self.blocks.names if b not in trained]
        best: tuple[dict[str, float], dict[str, torch.Tensor]] | None = None
        tried, seconds = [], 0.0
        start_state = self.run.load_model(f"stage-{start}") if start is not None else None
        for c in range(candidates):
            seed = self._stage_seed(index, c)
            self.blocks.unfreeze()
            if start_state is None:
                self.model.load_state_dict(self._fresh_model(seed).state_dict())
            else:
                self.model.load_state_dict(start_state)
                if reinit:
                    self.blocks.copy_blocks(self._fresh_model(seed), trained)
            self.blocks.freeze(frozen, frozen_dropout=self.cascade_cfg.frozen_dropout)
            result = fit(
                self.model,
                self.task,
                train,
                seed=seed,
                subset=subset,
                resume_path=self.run.state_file(index, c),
                on_epoch=lambda r, c=c: self.run.log_metrics({"stage": index, "candidate": c, **r}),
                desc=f"stage {index} ({role}{'' if candidates == 1 else f', candidate {c + 1}/{candidates}'})",
                device=self.device,
            )
            seconds += result.seconds
            tried.append({"seed": seed, "epochs": result.epochs, "val": result.val})
            if best is None or self.task.better(result.val[self.task.metric], best[0][self.task.metric]):
                best = (result.val, {k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.blocks.unfreeze()
        val, weights = best
        self.model.load_state_dict(weights)
        started = time.perf_counter()
        test = self._evaluate("test")
        record = {
            "index": index,
            "role": role,
            "split": split,
            "trained_blocks": list(trained),
            "frozen_blocks": frozen,
            "reinit": start is None or reinit,
            "subset": subset,
            "epochs": sum(t["epochs"] for t in tried),
            "candidates": tried,
            "val": val,
            "test": test,
            "accepted": None,
            "seconds": seconds + time.perf_counter() - started,
        }
        return self._record(record, weights, accept)

    def loaded_stage(self, path: str | Path, role: str = "loaded", accept: str = "always") -> dict[str, Any]:
        """Stage 0 from an existing checkpoint (``--from``): evaluated, not trained."""
        done = self._finished()
        if done is not None:
            return done
        tensors, _ = load_tensors(Path(path))
        try:
            self.model.load_state_dict(tensors)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ConfigError(f"checkpoint {path} does not fit this task's model: {' '.join(first[:3])[:300]}") from None
        started = time.perf_counter()
        record = {
            "index": 0, "role": role, "split": None, "trained_blocks": [], "frozen_blocks": self.blocks.names,
            "reinit": False, "subset": 1.0, "epochs": 0, "candidates": [], "val": self._evaluate("val"),
            "test": self._evaluate("test"), "accepted": None, "seconds": 0.0, "source": str(path),
        }
        record["seconds"] = time.perf_counter() - started
        return self._record(record, self.model.state_dict(), accept)

    def _evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in self.task.evaluate(self.model, split).items()}

    def _record(self, record: dict[str, Any], weights: dict[str, torch.Tensor], accept: str) -> dict[str, Any]:
        """Decide acceptance, then save checkpoints before the summary that points at them."""
        metric, current = self.task.metric, self.best_index
        if accept == "always":
            record["accepted"] = True
        elif accept == "never":
            record["accepted"] = False
        else:
            best_val = self.summary["stages"][current]["val"][metric] if current is not None else None
            record["accepted"] = self.task.better(record["val"][metric], best_val)
        meta = {"task": self.task.name, "stage": record["index"], "config": self.config, "task_info": dict(self.task.info)}
        self.run.save_model(f"stage-{record['index']}", weights, meta)
        if record["accepted"]:
            self.run.save_model("best", weights, meta)
            self.summary["chosen_stage"] = record["index"]
            self.summary["test"] = record["test"]
        self.summary["stages"].append(record)
        self.run.write_summary(self.summary)
        self.run.clear_state(record["index"])
        return record

    def _finished(self) -> dict[str, Any] | None:
        """The next stage's record if a resumed run has already finished it (it is then skipped)."""
        stages = self.summary["stages"]
        self.next_index += 1
        return stages[self.next_index - 1] if self.next_index <= len(stages) else None

    def finish(self) -> dict[str, Any]:
        self.summary["status"] = "complete"
        self.run.write_summary(self.summary)
        if self.run.writer:
            report.write(self.run.path)
        return self.summary


# -- the procedures ------------------------------------------------------------------------


def _stage_train(r: Runner, lr_scale: float = 1.0) -> TrainConfig:
    """The recipe for a cascade-type stage: the cascade's epochs and lr override the baseline's."""
    cc, tc = r.cascade_cfg, r.train_cfg
    return replace(tc, epochs=cc.epochs or tc.epochs, lr=(cc.lr or tc.lr) * lr_scale)


def _baseline_stage(r: Runner) -> dict[str, Any]:
    return r.stage("baseline", r.blocks.names, start=None, accept="always")


def _baseline_or_loaded(r: Runner, from_checkpoint: str | None) -> dict[str, Any]:
    """Stage 0 of a cascade or retrain-classifier: the ``--from`` model, or a trained baseline."""
    return r.loaded_stage(from_checkpoint) if from_checkpoint is not None else _baseline_stage(r)


def _run_baseline(r: Runner, proc: ProcedureConfig, from_checkpoint: str | None) -> None:
    _baseline_stage(r)


def _run_cascade(r: Runner, proc: ProcedureConfig, from_checkpoint: str | None) -> None:
    cc = r.cascade_cfg
    _baseline_or_loaded(r, from_checkpoint)
    splits = cc.splits if cc.splits is not None else list(range(len(r.blocks) - 1, 0, -1))
    rejected_in_a_row = 0
    for k in splits:
        lower, upper = r.blocks.split(k)
        rec = r.stage(
            "cascade", lower, start=r.best_index, reinit=cc.reinit, split=k, train=_stage_train(r), candidates=cc.candidates
        )
        rejected_in_a_row = 0 if rec["accepted"] else rejected_in_a_row + 1
        if cc.patience is not None and rejected_in_a_row >= cc.patience:
            break
    if cc.finetune_epochs > 0:
        tc = _stage_train(r)
        ft = replace(tc, epochs=cc.finetune_epochs, lr=cc.finetune_lr or 0.1 * tc.lr)
        r.stage("finetune", r.blocks.names, start=r.best_index, reinit=False, train=ft)


def _run_retrain_classifier(r: Runner, proc: ProcedureConfig, from_checkpoint: str | None) -> None:
    _baseline_or_loaded(r, from_checkpoint)
    _, upper = r.blocks.split(proc.split)
    r.stage("retrain-classifier", upper, start=0, split=proc.split, train=_stage_train(r))


def _run_transfer_classifier(r: Runner, proc: ProcedureConfig, from_checkpoint: str | None) -> None:
    lower, _ = r.blocks.split(proc.split)
    if from_checkpoint is not None:
        r.loaded_stage(from_checkpoint, role="full-data baseline", accept="never")
    else:
        r.stage("full-data baseline", r.blocks.names, start=None, accept="never")
    r.stage("subset baseline", r.blocks.names, start=None, subset=proc.subset, accept="always")
    r.stage("transfer", lower, start=0, split=proc.split, subset=proc.subset, train=_stage_train(r))


_RUNNERS = {
    "baseline": _run_baseline,
    "cascade": _run_cascade,
    "retrain-classifier": _run_retrain_classifier,
    "transfer-classifier": _run_transfer_classifier,
}


def _check(procedure: str, proc: ProcedureConfig, cc: CascadeConfig, n_blocks: int, from_checkpoint: str | None) -> None:
    """Reject option combinations that cannot work, before anything is trained or written."""
    if procedure == "baseline" and from_checkpoint is not None:
        raise ConfigError("baseline trains from scratch; --from is for cascade, retrain-classifier and transfer-classifier")
    if procedure in ("retrain-classifier", "transfer-classifier"):
        if proc.split is None:
            raise ConfigError(f"{procedure} needs a split (--split K, 1..{n_blocks - 1})")
        if not isinstance(proc.split, int) or not 1 <= proc.split < n_blocks:
            raise ConfigError(f"split {proc.split!r} is out of range: the model has {n_blocks} blocks, so 1..{n_blocks - 1}")
    if procedure == "transfer-classifier":
        if proc.subset is None or not 0 < proc.subset < 1:
            raise ConfigError(f"transfer-classifier needs --subset FRACTION in (0, 1), got {proc.subset!r}")
    if cc.splits is not None:
        ok = isinstance(cc.splits, list) and all(isinstance(k, int) and 1 <= k < n_blocks for k in cc.splits)
        if not ok or any(a <= b for a, b in zip(cc.splits, cc.splits[1:])):
            raise ConfigError(f"cascade.splits must be a strictly descending list of integers in 1..{n_blocks - 1}, got {cc.splits!r}")
    if cc.candidates < 1:
        raise ConfigError(f"cascade.candidates must be at least 1, got {cc.candidates}")


def run_procedure(
    procedure: str,
    task: Task,
    out: str | Path,
    *,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    preset: str | None = None,
    resume: bool = False,
    from_checkpoint: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run ``procedure`` on ``task`` into run directory ``out``; returns the summary.

    ``config`` is the resolved configuration: the method's sections (``train``,
    ``cascade``, ``procedure``) are merged over their defaults; other sections (the
    task's own) are recorded as given.
    """
    if procedure not in _RUNNERS:
        raise ConfigError(f"unknown procedure {procedure!r} ({', '.join(PROCEDURES)})")
    header = run_header(procedure, task, preset, seed, config)
    config = header["config"]
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    runner = Runner(task, config, RunDir(out, writer=rank0), seed, device)
    proc = from_dict(ProcedureConfig, config["procedure"])
    _check(procedure, proc, runner.cascade_cfg, len(runner.blocks), from_checkpoint)
    runner.open(header, resume)
    try:
        _RUNNERS[procedure](runner, proc, from_checkpoint)
    except TopdownError:
        runner.summary["status"] = "failed"
        runner.run.write_summary(runner.summary)
        raise
    return runner.finish()


def first_difference(recorded: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first key of ``wanted`` whose value the run record does not share, named for an error
    message (with the dotted paths that differ inside a nested dict, e.g. ``'config' (train.lr)``);
    None if the record matches."""
    def paths(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [p for k in sorted(set(a) | set(b), key=str) for p in paths(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]
    for key, value in wanted.items():
        if recorded.get(key) != value:
            inner = paths(recorded.get(key), value, "") if isinstance(value, dict) and isinstance(recorded.get(key), dict) else []
            return f"{key!r} ({', '.join(inner)})" if inner else repr(key)
    return None


def run_header(procedure: str, task: Task, preset: str | None, seed: int, config: dict[str, Any] | None) -> dict[str, Any]:
    """What identifies a run in its record: the procedure, task, preset, seed and the resolved
    config (the method's sections merged over their defaults; the task's sections as given)."""
    config = dict(config or {})
    config.update(merge(method_defaults(), {k: v for k, v in config.items() if k in ("train", "cascade", "procedure")}))
    return {"procedure": procedure, "task": task.name, "preset": preset, "seed": seed, "config": config}


def run_or_resume(procedure: str, task: Task, out: Path, **kw) -> dict[str, Any]:
    """The summary of the run in ``out``: read back if complete, otherwise run or resume it.

    Used by commands that are made of many runs (compare, analyse), so that an interrupted
    one continues without training any finished run again. A finished run is reused only if
    it was made by the same procedure, task, preset, seed and configuration: anything else
    would silently mix two experiments."""
    existing = RunDir(out).read_summary()
    if existing is not None and existing.get("status") == "complete":
        wanted = run_header(procedure, task, kw.get("preset"), kw.get("seed", 0), kw.get("config"))
        if difference := first_difference(existing, wanted):
            raise TopdownError(f"cannot reuse {out}: its {difference} differs from this command's; choose another --out")
        return existing
    return run_procedure(procedure, task, out, resume=True, **kw)


def baseline(task: Task, out: str | Path, *, train: TrainConfig | None = None, **kw) -> dict[str, Any]:
    """Train all blocks jointly (stage 0 only)."""
    return run_procedure("baseline", task, out, config=_sections(train=train), **kw)


def cascade(
    task: Task, out: str | Path, *, train: TrainConfig | None = None, cascade: CascadeConfig | None = None, **kw
) -> dict[str, Any]:
    """Top-down cascade: baseline (or ``from_checkpoint``), then one stage per split, accepted on validation."""
    return run_procedure("cascade", task, out, config=_sections(train=train, cascade=cascade), **kw)


def retrain_classifier(task: Task, out: str | Path, split: int, *, train: TrainConfig | None = None, **kw) -> dict[str, Any]:
    """From the baseline, freeze blocks 1..split and train fresh blocks above them."""
    return run_procedure("retrain-classifier", task, out, config=_sections(train=train, procedure=ProcedureConfig(split=split)), **kw)


def transfer_classifier(
    task: Task, out: str | Path, split: int, subset: float, *, train: TrainConfig | None = None, **kw
) -> dict[str, Any]:
    """Classifier of a full-data model, fresh feature extractor trained on a subset, against a subset baseline."""
    return run_procedure(
        "transfer-classifier", task, out, config=_sections(train=train, procedure=ProcedureConfig(split=split, subset=subset)), **kw
    )


def _sections(**sections) -> dict[str, Any]:
    return {name: asdict(value) for name, value in sections.items() if value is not None}
