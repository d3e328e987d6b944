"""The run record a plan writes through: in memory, or in a run directory.

A plan (``plan.py``) is the method: which stages, what they train, which one is accepted. What
it has decided goes to its record: ``Record`` keeps it in memory (a plan given no ``out``: nothing
is written, the weights later stages start from are kept as CPU state dicts), ``RunRecord``
writes it to a run directory (``runs.RunDir``, docs/run-directory.md) and can continue it there
(``resume``): identity, checkpoints and their checksums, finished candidates, resume points, the
report. Under DDP only rank 0 writes; every rank reads what rank 0 decided. A plan built before
the ranks' process group exists (a trainer's launcher creates it later) starts its other ranks from
what rank 0 has on disk, and the ranks agree on rank 0's record once the group exists (``agree``).
A run directory's epochs and stages also go to the trackers the plan was given (``tracking``:
TensorBoard, MLflow).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from topdown import distributed, lock, report
from topdown.console import warn
from topdown.errors import ConfigError, TopdownError
from topdown.files import atomic_write, load_tensors, os_reason
from topdown.identity import recorded_mismatch
from topdown.runs import RunDir, stage_checkpoint
from topdown.tracking import Trackers, Tracking

# the resolved config, as `--config` reads it: `--config DIR/config.yaml` runs the run again
CONFIG_FILE = "config.yaml"
REPORT_FILES = ("report.md", "curves.png")  # what ``report.write`` renders; a complete run has both

# A finished candidate of a stage with several: its results (seed, epochs, val), test metrics,
# seconds and weights, until the stage's last candidate decides which one is the stage's.
Candidate = tuple[dict[str, Any], dict[str, float], float, dict[str, torch.Tensor]]


def _trained_by(summary: dict[str, Any]) -> int | None:
    """How many processes trained the run last (None: no continuation recorded it); a record older
    than ``world_size`` was one process."""
    for entry in reversed([summary.get("provenance", {}), *summary.get("resumed_on", [])]):
        if (n := entry.get("world_size", 1)) is not None:
            return n
    return None


def new_summary(header: dict[str, Any]) -> dict[str, Any]:
    """A new run's record: its ``header`` (identity, blocks, provenance), no stage yet."""
    return {**header, "status": "running", "stages": [], "chosen_stage": None, "test": None}


class Record:
    """A plan's record kept in memory: ``summary`` has the same content as a run directory's
    ``summary.json`` (without checksums), and nothing is written anywhere."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self._weights: dict[int, dict[str, torch.Tensor]] = {}

    def open(
        self,
        header: dict[str, Any],
        resume: bool,
        option_defaults: Mapping[str, Any],
        from_checkpoint: str | None,
    ) -> None:
        """Start the record with ``header`` (the run's identity and provenance)."""
        if resume:
            raise ConfigError("resume=True continues a run directory: give the plan one (out=...)")
        self.summary = new_summary(header)

    def agree(self) -> None:
        """Called as each stage finishes (on every rank): once the processes are known, the run records
        how many there are and every rank holds rank 0's record (in memory, every rank builds the same)."""
        if self.summary["provenance"]["world_size"] is None:
            self.summary["provenance"]["world_size"] = distributed.world_size()

    def log(self, line: dict[str, Any]) -> None:
        """One epoch's metrics (``metrics.jsonl`` in a run directory)."""

    def forget_metrics(self, stage: int) -> None:
        """Drop the epoch lines logged for ``stage`` (its own training, replaced by another run's)."""

    def resume_point(self, stage: int, candidate: int) -> Path | None:
        """Where a loop that can resume mid-stage keeps a candidate's resume point (none in memory)."""
        return None

    def saved_candidate(self, stage: int, candidate: int) -> Candidate | None:
        """A candidate finished before the run was resumed (none in memory)."""
        return None

    def save_candidate(
        self, stage: int, candidate: int, weights: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """Keep a finished candidate (not the stage's last) for a resumed run (nothing to keep in memory)."""

    def add_stage(
        self, record: dict[str, Any], weights: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """Record a finished stage and its model (``meta`` describes it in a checkpoint's header)."""
        self._weights[record["index"]] = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        if record["accepted"]:
            self.summary["chosen_stage"], self.summary["test"] = record["index"], record["test"]
        self.summary["stages"].append(record)

    def stage_weights(self, index: int) -> dict[str, torch.Tensor]:
        """The model stage ``index`` ended with: a later stage starts from it."""
        return self._weights[index]

    def chosen_weights(self) -> dict[str, torch.Tensor] | None:
        """The chosen model (None while no stage was accepted)."""
        chosen = self.summary["chosen_stage"]
        return None if chosen is None else self._weights[chosen]

    def fail(self) -> None:
        """The run stopped on an error."""
        self.summary["status"] = "failed"

    def complete(self) -> None:
        """Every stage is recorded."""
        self.summary["status"] = "complete"


class RunRecord(Record):
    """A plan's record in the run directory ``path``, written atomically after every stage (rank 0
    writes, under DDP). ``open`` starts it, or continues the one there (``resume``). ``track``: the
    trackers that also get its epochs and stages (rank 0's)."""

    def __init__(self, path: str | Path, track: Tracking | None = None):
        super().__init__()
        self.run = RunDir(path, writer=distributed.is_writer())
        self.path = self.run.path
        self._agreed = True  # False while the ranks may hold different records (no process group yet)
        # this continuation's provenance while its number of processes is unknown, and the number that
        # trained the run before it (None: not recorded)
        self._unsettled: tuple[dict[str, Any], int | None] | None = None
        self.tracked = (track or Tracking()).trackers(self.path) if self.run.writer else Trackers()

    # -- opening --------------------------------------------------------------------------

    def open(
        self,
        header: dict[str, Any],
        resume: bool,
        option_defaults: Mapping[str, Any],
        from_checkpoint: str | None,
    ) -> None:
        """Start a new run record, or continue the one in the directory (``resume``), refused if
        it is another run. Rank 0 decides, and every rank gets its record (or its error)."""
        if not distributed.active():
            self._agreed = distributed.world_size() == 1 and distributed.settled()
            if not self.run.writer:
                # another rank of a launcher, before the process group exists: rank 0 opens the record
                # (Lightning starts this process once it has; torchrun starts all at once, and a rank 0
                # that refuses the run brings this one down), which holds the stages it finished
                self.summary = (self.run.read_summary() if resume else None) or new_summary(header)
                return
        outcome = None
        if self.run.writer:
            try:
                outcome = ("record", self._open_here(header, resume, option_defaults, from_checkpoint))
            except OSError as e:  # a directory above the run's that may not be entered
                self._release()
                outcome = ("error", f"cannot open {self.path}: {os_reason(e)}")
            except TopdownError as e:
                self._release()
                outcome = ("error", str(e))
        kind, value = distributed.same_on_every_rank(outcome)
        if kind == "error":
            raise TopdownError(value)
        self.summary = value

    def _open_here(
        self,
        header: dict[str, Any],
        resume: bool,
        option_defaults: Mapping[str, Any],
        from_checkpoint: str | None,
    ) -> dict[str, Any]:
        if self.path.exists() and not self.path.is_dir():
            raise TopdownError(
                f"{self.path} is a file, not a run directory; choose another output directory (--out)"
            )
        lock.claim(self.path)
        existing = self.run.read_summary()
        failed_untrained = existing is not None and not resume and self.run.failed_before_saving(existing)
        if failed_untrained:
            warn(
                f"starting afresh in {self.path}: the run there stopped on an error before it saved "
                "any training"
            )
        if existing is None or failed_untrained:
            summary = self._start(header, resume, replaces_a_run=failed_untrained)
        elif not resume:
            raise TopdownError(
                f"{self.path} already holds a run; resume it (--resume; resume=True) or choose another "
                "output directory"
            )
        else:
            summary = self._continue(existing, header, option_defaults, from_checkpoint)
        self._write_config(header["config"])  # a run resumed from before config.yaml existed gains it
        self._open_trackers(summary, new=existing is None or failed_untrained)
        return summary

    def _open_trackers(self, summary: dict[str, Any], new: bool) -> None:
        """Catch the trackers up on the record; one that cannot open stops the run before it trains
        (marked failed: a run that had saved no training may then be started afresh)."""
        try:
            self.tracked.open(summary, self.run.read_metrics(), new)
        except TopdownError:
            if summary["status"] == "running":
                summary["status"] = "failed"
                self.run.write_summary(summary)
            raise

    def _write_config(self, config: Mapping[str, Any]) -> None:
        """``config.yaml``: the run's resolved config, which ``--config`` reads back (rewritten only
        where it differs: resuming a run whose file is current writes nothing)."""
        text, path = yaml.safe_dump(dict(config), sort_keys=False), self.path / CONFIG_FILE
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _start(self, header: dict[str, Any], resume: bool, replaces_a_run: bool) -> dict[str, Any]:
        """A new run's first record, in a directory that is new, empty, holds only the debris of a
        first write, or (``replaces_a_run``) a run that stopped before it saved any training."""
        if resume:
            raise TopdownError(
                f"nothing to resume in {self.path} (no summary.json); start a run there without "
                "--resume (resume=False)"
            )
        if self.run.holds_only_debris():  # killed while writing its first summary: nothing was saved yet
            self._remove_debris()
        if not replaces_a_run and self.path.is_dir() and any(self.path.iterdir()):
            raise TopdownError(
                f"{self.path} is not empty and holds no run (no summary.json); choose another output "
                "directory (--out)"
            )
        summary = new_summary(header)
        if header["provenance"]["world_size"] is None:
            self._unsettled = (summary["provenance"], None)
        self.run.write_summary(summary)
        lock.claim(self.path)  # the directory exists now
        return summary

    def _refuse_other_processes(self, before: int | None, now: int) -> None:
        """A stage interrupted under N processes continues under N: each takes every N-th batch."""
        if before is not None and before != now:
            raise TopdownError(
                f"cannot resume {self.path}: it was trained by {before} process(es) and this command has "
                f"{now}; resume with the same number (--nproc, torchrun's --nproc_per_node, a trainer's "
                "devices)"
            )

    def _continue(
        self,
        existing: dict[str, Any],
        header: dict[str, Any],
        option_defaults: Mapping[str, Any],
        from_checkpoint: str | None,
    ) -> dict[str, Any]:
        """The recorded run, to resume: refused if it is another run (identity, starting weights, number
        of processes); its checkpoints verified, and what a kill left half-written cleared."""
        identity = {k: v for k, v in header.items() if k != "provenance"}  # another machine may continue
        if reason := recorded_mismatch(existing, identity, option_defaults, from_checkpoint):
            raise TopdownError(f"cannot resume {self.path}: {reason}")
        for name in self.run.verify(existing):
            warn(
                f"restored {name}.safetensors from the chosen stage's checkpoint (a kill came between "
                "writing it and the record)"
            )
        self._remove_debris()
        finished = len(existing["stages"])
        if existing["status"] != "complete":
            before, now = _trained_by(existing), header["provenance"]["world_size"]
            if now is None:  # known once the stages run (``agree``)
                self._unsettled = (header["provenance"], before)
            else:
                self._refuse_other_processes(before, now)
            existing.setdefault("resumed_on", []).append(header["provenance"])
        for index in range(finished):
            self.run.clear_state(index)  # left behind if a kill came right after the stage was recorded
        self._drop_unsaved_metrics(finished)
        if existing["status"] != "complete":
            existing["status"] = "running"
            self.run.write_summary(
                existing
            )  # this continuation on record now, even if it ends before a stage
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
            # a finished candidate keeps all its lines
            epoch = meta["loop"]["epoch"] if "loop" in meta else float("inf")
            kept_epochs[candidate] = max(kept_epochs.get(candidate, 0), epoch)
        self.run.keep_metrics(
            lambda r: (
                r["stage"] < next_stage
                or (r["stage"] == next_stage and r["epoch"] <= kept_epochs.get(r["candidate"], 0))
            )
        )

    # -- while the stages run ---------------------------------------------------------------

    def agree(self) -> None:
        """Once the stages run, the number of processes is known (a launcher has created the process
        group, or there is none: one process). Rank 0 records it (refusing to continue a run trained
        by another number), and every rank takes rank 0's record. Called on every rank, at the same
        points (``Stage.finish``, and the Lightning adapter before training)."""
        if self._agreed:
            return
        self._agreed = True
        outcome = None
        if self.run.writer:
            try:
                if self._unsettled is not None:
                    (entry, before), now = self._unsettled, distributed.world_size()
                    self._refuse_other_processes(before, now)
                    entry["world_size"], self._unsettled = now, None
                    self.run.write_summary(self.summary)
                outcome = ("record", self.summary)
            except TopdownError as e:
                outcome = ("error", str(e))
        elif not distributed.active():
            raise TopdownError(
                f"process {distributed.rank()} of {distributed.world_size()} reached the end of a stage "
                "without a process group: join one (torch.distributed.init_process_group, or a trainer "
                "that does) before training"
            )
        kind, value = distributed.same_on_every_rank(outcome)
        if kind == "error":
            raise TopdownError(value)
        self.summary = value

    def log(self, line: dict[str, Any]) -> None:
        self.run.log_metrics(line)
        self.tracked.epoch(line)

    def forget_metrics(self, stage: int) -> None:
        self.run.keep_metrics(lambda r: r["stage"] != stage)

    def resume_point(self, stage: int, candidate: int) -> Path:
        return self.run.state_file(stage, candidate)

    def saved_candidate(self, stage: int, candidate: int) -> Candidate | None:
        saved = self.run.load_candidate(stage, candidate)
        if saved is None:
            return None
        weights, meta = saved
        tried = {k: meta[k] for k in ("seed", "epochs", "val", "kept_epoch") if k in meta}
        return tried, meta["test"], meta["seconds"], weights

    def save_candidate(
        self, stage: int, candidate: int, weights: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        self.run.save_candidate(stage, candidate, weights, meta)

    def add_stage(
        self, record: dict[str, Any], weights: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """Save the stage's checkpoint (and ``best``, if accepted) before the summary that points at them."""
        index = record["index"]
        checksums = self.summary.setdefault("checksums", {})
        checksums[stage_checkpoint(index)] = self.run.save_model(stage_checkpoint(index), weights, meta)
        if record["accepted"]:
            checksums["best"] = self.run.save_model("best", weights, meta)
        self._append(record)
        self.run.write_summary(self.summary)
        self.tracked.stage(record)
        self.run.clear_state(index)
        distributed.barrier()  # the next stage may start from this stage's checkpoint, on every rank

    def stage_weights(self, index: int) -> dict[str, torch.Tensor]:
        return self.run.load_model(stage_checkpoint(index))

    def chosen_weights(self) -> dict[str, torch.Tensor] | None:
        best = self.run.checkpoint("best")
        return load_tensors(best)[0] if best.is_file() else None

    # -- the end ------------------------------------------------------------------------------

    def fail(self) -> None:
        """Record, if the disk still lets us, that the run stopped on an error (it can be resumed)."""
        super().fail()
        try:
            self.run.write_summary(self.summary)
        except TopdownError:
            pass  # the error being raised says why; the last good record stays on disk
        self.tracked.close(self.summary)
        self._release()

    def complete(self) -> None:
        """Mark the run complete and render its report. A run killed after it was marked complete
        but before its report was written gets the report now: a resumed run's directory holds
        every file an uninterrupted one does."""
        was_complete = self.summary["status"] == "complete"
        if not was_complete:
            super().complete()
            self.run.write_summary(self.summary)
        if self.run.writer and not (was_complete and all((self.path / f).is_file() for f in REPORT_FILES)):
            report.write(self.path)
        self.tracked.close(self.summary)
        self._release()

    def _release(self) -> None:
        lock.release(self.path)
