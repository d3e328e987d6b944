"""Experiment tracking: a run's per-epoch metrics and stage decisions, also sent to TensorBoard
(``--track tensorboard``) and MLflow (``--track mlflow``), the optional ``tracking`` extra.

The run directory stays the record (docs/run-directory.md); a tracker is a view of it, fed by the
one place a run's epochs and stages are recorded (``record.RunRecord``), so our loop, a user's loop
through a plan and the Lightning adapter all log. When the run is opened, each tracker first
catches up on what the record holds and it lacks (a resumed run, or ``--track`` added on resume),
then receives every epoch and stage as it is recorded. Only the process that writes the run
(rank 0 under data parallelism) logs.

What is logged, and at which step: each number of a ``metrics.jsonl`` line under its key (nested
keys joined by ``/``: ``val/error``), at the line's position in the file (1-based: the stages end
to end, as ``curves.png`` draws them); each number of a stage record under ``stages/`` (``accepted``
and other booleans as 1 or 0), at the stage's index; once the run is complete, ``chosen_stage`` and
the chosen stage's test metrics (``test/...``) at step 0.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from topdown.console import warn
from topdown.errors import ConfigError, TopdownError
from topdown.files import os_reason, write_json

TRACKERS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}  # name -> the module it needs
TENSORBOARD_DIR = "tensorboard"  # DIR/tensorboard/: the run's TensorBoard event files
MLFLOW_DIR = "mlruns"  # DIR/mlruns/: the run's own MLflow file store, unless a tracking URI is given
MLFLOW_RUN = "mlflow.json"  # DIR/mlflow.json: the MLflow run this run logs to, continued on resume


def _require(tracker: str) -> Any:
    """The module ``tracker`` writes with, or one line naming the extra that provides it."""
    try:
        return importlib.import_module(TRACKERS[tracker])
    except ImportError:
        raise ConfigError(
            f"--track {tracker} needs the tracking extra (tensorboard, mlflow-skinny): "
            'pip install "topdown[tracking]"'
        ) from None


@dataclass(frozen=True)
class Tracking:
    """Where a run logs, besides its run directory. ``to``: tracker names (``"tensorboard"``,
    ``"mlflow"``; a string may list several, comma-separated). ``mlflow_uri``: the MLflow tracking
    URI (default: a file store in the run directory, ``DIR/mlruns``). ``experiment``: the MLflow
    experiment (default: the task's name). Building one checks the trackers can be imported, so a
    missing extra is refused before a run starts."""

    to: tuple[str, ...] = ()
    mlflow_uri: str | None = None
    experiment: str | None = None

    def __post_init__(self) -> None:
        names = self.to.split(",") if isinstance(self.to, str) else self.to
        names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        if unknown := [n for n in names if n not in TRACKERS]:
            raise ConfigError(f"unknown tracker {unknown[0]!r} (--track); trackers: {', '.join(TRACKERS)}")
        if self.mlflow_uri is not None and "mlflow" not in names:
            raise ConfigError("an MLflow tracking URI (--mlflow-uri) is for --track mlflow; add it")
        for name in names:
            _require(name)
        object.__setattr__(self, "to", names)

    @classmethod
    def of(cls, track: Tracking | str | Sequence[str] | None) -> Tracking:
        """``track`` as a ``Tracking``: tracker names (a string or a list) or a ``Tracking``; None: none."""
        return (
            track
            if isinstance(track, Tracking)
            else cls(tuple(track) if isinstance(track, list) else track or ())
        )

    def of_runs_in(self, out: Path) -> Tracking:
        """The tracking of the runs of a comparison or analysis in ``out``: every run its own
        TensorBoard directory, and with MLflow one experiment named by ``out`` (unless given) in one
        file store, ``out/mlruns`` (unless a URI is given), so that one view shows them together."""
        if "mlflow" not in self.to:
            return self
        uri = self.mlflow_uri or (Path(out) / MLFLOW_DIR).resolve().as_uri()
        return dataclasses.replace(self, mlflow_uri=uri, experiment=self.experiment or Path(out).name)

    def trackers(self, run: Path) -> Trackers:
        """The trackers of the run directory ``run``."""
        built = {"tensorboard": lambda: TensorBoard(run), "mlflow": lambda: MLflow(run, self)}
        return Trackers([built[name]() for name in self.to])


def numbers(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a record (a metrics line, a stage record) as ``(key, value)``: nested dicts'
    keys joined by ``/``, booleans as 1 or 0; text, lists and nulls (a NaN metric) left out."""
    for key, value in record.items():
        if isinstance(value, Mapping):
            yield from numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (bool, int, float)):
            yield f"{prefix}{key}", float(value)


class Tracker:
    """One tracker. ``open`` catches it up on the run's record (``new``: the record was just
    started, nothing of an earlier run in the directory is continued); ``epoch`` and ``stage`` log
    as the run records; ``close`` logs the outcome (the chosen stage, once complete)."""

    name = "tracker"

    def open(self, summary: dict[str, Any], lines: list[dict[str, Any]], new: bool) -> None:
        raise NotImplementedError

    def epoch(self, step: int, line: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def stage(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self, summary: Mapping[str, Any]) -> None:
        raise NotImplementedError


@dataclass
class Trackers:
    """The trackers of one run, as its record calls them. Opening is checked (a bad URI is an error
    before training); after that, a tracker that fails is said once and dropped: the run goes on,
    its record intact (``--resume`` with the same ``--track`` catches the tracker up)."""

    active: list[Tracker] = field(default_factory=list)
    step: int = 0  # epochs logged: the next epoch's step is one more

    def open(self, summary: dict[str, Any], lines: list[dict[str, Any]], new: bool) -> None:
        self.step = len(lines)
        for tracker in self.active:
            try:
                tracker.open(summary, lines, new)
            except TopdownError:
                raise
            except Exception as e:  # the tracker's own error: a bad URI, a server that does not answer
                raise TopdownError(f"--track {tracker.name}: {_reason(e)}") from None

    def epoch(self, line: Mapping[str, Any]) -> None:
        self.step += 1
        self._each("epoch", self.step, line)

    def stage(self, record: Mapping[str, Any]) -> None:
        self._each("stage", record)

    def close(self, summary: Mapping[str, Any]) -> None:
        self._each("close", summary)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                self.active.remove(tracker)
                warn(
                    f"--track {tracker.name} stopped: {_reason(e)}; the run goes on and its record is intact "
                    f"(--resume with --track {tracker.name} catches the tracker up)"
                )


def _reason(e: BaseException) -> str:
    """A tracker's error, in a line."""
    text = os_reason(e) if isinstance(e, OSError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:300]


class TensorBoard(Tracker):
    """Event files in ``DIR/tensorboard/``, rewritten from the record whenever the run is opened:
    they hold exactly the epochs ``metrics.jsonl`` keeps (a resumed run trains again the epochs it
    dropped) and the stages ``summary.json`` records."""

    name = "tensorboard"

    def __init__(self, run: Path):
        self.path = run / TENSORBOARD_DIR
        self.writer = None

    def open(self, summary: dict[str, Any], lines: list[dict[str, Any]], new: bool) -> None:
        for old in self.path.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = _require(self.name).SummaryWriter(str(self.path))
        for step, line in enumerate(lines, 1):
            self._scalars(line, "", step)
        for record in summary["stages"]:
            self._scalars(record, "stages/", record["index"])
        self.writer.flush()

    def _scalars(self, record: Mapping[str, Any], prefix: str, step: int) -> None:
        for key, value in numbers(record, prefix):
            self.writer.add_scalar(key, value, step)

    def epoch(self, step: int, line: Mapping[str, Any]) -> None:
        self._scalars(line, "", step)
        self.writer.flush()

    def stage(self, record: Mapping[str, Any]) -> None:
        self._scalars(record, "stages/", record["index"])
        self.writer.flush()

    def close(self, summary: Mapping[str, Any]) -> None:
        if summary["status"] == "complete":
            self._scalars({"chosen_stage": summary["chosen_stage"], "test": summary["test"] or {}}, "", 0)
        self.writer.close()


class MLflow(Tracker):
    """One MLflow run per run directory, named by it, in the experiment ``Tracking.experiment`` (or
    the task's name), with the run's identity and resolved config as parameters. Its id is kept in
    ``DIR/mlflow.json``: a resumed run continues the same MLflow run (while the tracking URI is the
    same) and logs only the epochs and stages it lacks. MLflow never forgets a value: an epoch trained
    again after a resume (one whose resume point a kill prevented) is logged again at its step."""

    name = "mlflow"

    def __init__(self, run: Path, tracking: Tracking):
        self.run, self.uri, self.experiment = run, tracking.mlflow_uri, tracking.experiment
        self.client, self.run_id = None, None

    def open(self, summary: dict[str, Any], lines: list[dict[str, Any]], new: bool) -> None:
        uri = self.uri or (self.run / MLFLOW_DIR).resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store in maintenance and refuses it unless asked; the client
            # without the server's dependencies (mlflow-skinny) has no database store to use instead
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.client = _require(self.name).tracking.MlflowClient(tracking_uri=uri)
        saved, state = None, self.run / MLFLOW_RUN
        if not new and state.is_file():
            saved = json.loads(state.read_text())
        if saved is not None and saved.get("tracking_uri") == self.uri and self._exists(saved["run_id"]):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create(summary)
            write_json(state, {"tracking_uri": self.uri, "run_id": self.run_id})
        logged = self._steps("stage")  # every metrics line has its stage
        for step, line in enumerate(lines, 1):
            if step > max(logged, default=0):
                self.epoch(step, line)
        stages = self._steps("stages/index")
        for record in summary["stages"]:
            if record["index"] not in stages:
                self.stage(record)

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted from the store, or a store that never had it
            return False

    def _create(self, summary: Mapping[str, Any]) -> str:
        """A new MLflow run, its parameters logged; returns its id."""
        from mlflow.entities import Param

        name = self.experiment or summary["task"]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # another process (--jobs) created it first
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run_id = self.client.create_run(experiment_id, run_name=self.run.name).info.run_id
        identity = {k: summary[k] for k in ("procedure", "task", "preset", "seed", "metric")}
        params = [
            Param(k, v if isinstance(v, str) else json.dumps(v))
            for k, v in (*_flat(identity), *_flat(summary["config"], "config."))
        ]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(run_id, params=params[i : i + 100])
        return run_id

    def _steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def _log(self, values: Iterator[tuple[str, float]], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics := [Metric(k, v, now, step) for k, v in values]:
            self.client.log_batch(self.run_id, metrics=metrics)

    def epoch(self, step: int, line: Mapping[str, Any]) -> None:
        self._log(numbers(line), step)

    def stage(self, record: Mapping[str, Any]) -> None:
        self._log(numbers(record, "stages/"), record["index"])

    def close(self, summary: Mapping[str, Any]) -> None:
        if summary["status"] == "complete":
            outcome = dict(numbers({"chosen_stage": summary["chosen_stage"], "test": summary["test"] or {}}))
            logged = self.client.get_run(self.run_id).data.metrics  # a resumed complete run logged them
            self._log(((k, v) for k, v in outcome.items() if logged.get(k) != v), 0)
        self.client.set_terminated(self.run_id, "FINISHED" if summary["status"] == "complete" else "FAILED")


def _flat(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A nested dict's leaves as ``(dotted key, value)`` (the config keys as ``--set`` names them)."""
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
