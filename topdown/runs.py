"""The run directory: summary, per-epoch metrics, checkpoints, resume points. Every write is atomic.

Layout (a contract other tools rely on; see docs/run-directory.md):
``summary.json``, ``metrics.jsonl``, ``checkpoints/stage-<i>.safetensors``,
``checkpoints/best.safetensors``, ``report.md``, ``curves.png``, and ``state/`` (resume
points of unfinished stages, removed once a stage is recorded). ``RunDir`` reads and writes
these files; what a run record does with them (open, resume, record a stage) is ``record.py``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from topdown.errors import TopdownError
from topdown.files import (
    DEBRIS,
    WriteError,
    atomic_write,
    digest,
    file_digest,
    load_tensors,
    os_reason,
    save_tensors,
    write_json,
)


def stage_checkpoint(index: int) -> str:
    """The checkpoint name of stage ``index``: ``checkpoints/stage-<i>.safetensors`` (``best`` is
    the chosen stage's copy)."""
    return f"stage-{index}"


class RunDir:
    """One run's directory. Only rank 0 writes (``writer=False`` elsewhere)."""

    def __init__(self, path: str | os.PathLike, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.checkpoints = self.path / "checkpoints"
        self.state = self.path / "state"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_summary(self) -> dict[str, Any] | None:
        """The run record, or None if the directory holds none. A directory that may not be
        entered (no permission) is a one-line error naming it, not a traceback."""
        try:
            if not self.summary_path.is_file():
                return None
            return json.loads(self.summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TopdownError(
                f"{self.summary_path} is corrupt, not a run record ({str(e).splitlines()[0][:120]})"
            ) from None
        except OSError as e:
            raise TopdownError(f"cannot read {self.summary_path}: {os_reason(e)}") from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer:
            write_json(self.summary_path, summary)

    def read_metrics(self) -> list[dict[str, Any]]:
        return self._metric_lines()[0]

    def _metric_lines(self) -> tuple[list[dict[str, Any]], int]:
        """The epochs' records, and how many lines hold them. A last line that is not JSON is an
        append cut short (a kill, a full disk): it is left out, and its epoch, whose resume point
        was not written yet, is trained and logged again on resume. A bad line before it is an error."""
        if not self.metrics_path.is_file():
            return [], 0
        lines = [line for line in self.metrics_path.read_text(errors="replace").splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise TopdownError(
                        f"{self.metrics_path}: line {i + 1} is not a JSON record (the file is damaged)"
                    ) from None
        return records, len(lines)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.writer:
            try:
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise WriteError(f"cannot write {self.metrics_path}: {os_reason(e)}") from None

    def keep_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop metric lines a resumed run will write again (epochs after its resume point)."""
        if self.writer and self.metrics_path.is_file():
            records, lines = self._metric_lines()
            kept = [r for r in records if keep(r)]
            if len(kept) == lines:
                return  # nothing to drop, nor a torn last line: write nothing (a run may be read-only)
            atomic_write(
                self.metrics_path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept))
            )

    def checkpoint(self, name: str) -> Path:
        """Where checkpoint ``name`` (``best``, or a ``stage_checkpoint``) lies."""
        return self.checkpoints / f"{name}.safetensors"

    @classmethod
    def of_checkpoint(cls, path: Path) -> RunDir | None:
        """The run a checkpoint file belongs to, if it lies in a run's ``checkpoints/``."""
        return cls(path.parent.parent) if path.parent.name == "checkpoints" else None

    def save_model(self, name: str, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str | None:
        """Write checkpoint ``name``; returns its sha256 (recorded in the summary, checked on reuse)."""
        if self.writer:
            save_tensors(self.checkpoint(name), state, metadata)
            return digest(state, metadata)
        return None

    def verify(self, summary: dict[str, Any], *, weights_needed: bool = True) -> list[str]:
        """Check every checkpoint against the checksum the summary recorded; a TopdownError names
        the corrupt or missing files and the intact ones. With ``weights_needed=False`` (a caller
        that reads only the summary) a run whose checkpoints were all deleted passes: pruned to
        save disk, or its summary copied back from committed results onto a new machine.

        ``best`` is a copy of the chosen stage's checkpoint, written just before the record that
        names it: a kill in between leaves a newer ``best`` than the record. It is restored from
        the chosen stage's intact checkpoint; returns what was restored."""
        recorded = summary.get("checksums") or {}
        if not weights_needed and not any(self.checkpoint(name).exists() for name in recorded):
            return []
        bad = [name for name, wanted in recorded.items() if file_digest(self.checkpoint(name)) != wanted]
        chosen = stage_checkpoint(summary.get("chosen_stage"))
        restored = []
        if "best" in bad and chosen not in bad and recorded.get(chosen) == recorded["best"] and self.writer:
            source = self.checkpoint(chosen)
            atomic_write(self.checkpoint("best"), lambda p: p.write_bytes(source.read_bytes()))
            bad.remove("best")
            restored.append("best")
        if bad:
            intact = [name for name in recorded if name not in bad]
            raise TopdownError(
                f"{self.path}: checkpoints {', '.join(bad)} are corrupt or missing (they do not match the "
                f"checksums in summary.json); intact: {', '.join(intact) or 'none'}. Start the run again "
                "in another directory"
            )
        return restored

    def failed_before_saving(self, summary: dict[str, Any]) -> bool:
        """Did the run recorded by ``summary`` stop on an error before it saved anything of its
        training (no stage, epoch, checkpoint or resume point)? Such a run can be started afresh."""
        if summary.get("status") != "failed" or summary.get("stages"):
            return False
        saved = [*self.checkpoints.glob("*.safetensors"), *self.state.glob("*.safetensors")]
        return not saved and not self.read_metrics()

    def holds_only_debris(self) -> bool:
        """Is the directory non-empty but for temporary files of atomic writes (a run killed
        while writing its first summary)?"""
        entries = list(self.path.iterdir()) if self.path.is_dir() else []
        return bool(entries) and all(f.is_file() and f.match(DEBRIS) for f in entries)

    def remove_debris(self) -> list[Path]:
        """Delete temporary files a kill during an atomic write left behind; returns them."""
        debris = list(self.path.rglob(DEBRIS)) if self.writer and self.path.is_dir() else []
        for f in debris:
            f.unlink(missing_ok=True)
        return debris

    def load_model(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.checkpoint(name))[0]

    @classmethod
    def load_checkpoint(cls, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A checkpoint file's tensors and metadata; one of a run's ``checkpoints/`` is first checked
        against the checksum its run recorded (a corrupt file is named, not silently used)."""
        if (owner := cls.of_checkpoint(path)) and (recorded := owner.read_summary()):
            wanted = (recorded.get("checksums") or {}).get(path.stem)
            if wanted is not None and file_digest(path) != wanted:
                raise TopdownError(
                    f"checkpoint {path} is corrupt: it does not match the checksum its run "
                    "recorded in summary.json"
                )
        return load_tensors(path)

    def state_file(self, stage: int, candidate: int) -> Path:
        return self.state / f"stage-{stage}-candidate-{candidate}.safetensors"

    def candidate_file(self, stage: int, candidate: int) -> Path:
        return self.state / f"stage-{stage}-candidate-{candidate}.result.safetensors"

    def save_candidate(
        self, stage: int, candidate: int, weights: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """A finished candidate of a stage with several (its weights and results), kept until the
        stage is recorded."""
        if self.writer:
            save_tensors(self.candidate_file(stage, candidate), weights, {"candidate": meta})

    def load_candidate(
        self, stage: int, candidate: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        path = self.candidate_file(stage, candidate)
        if not path.is_file():
            return None
        tensors, meta = load_tensors(path)
        return tensors, meta["candidate"]

    def stage_state(self, stage: int) -> list[tuple[int, Path]]:
        """The files ``stage`` keeps until it is recorded (its candidates' resume points and finished
        results), each with its candidate's number."""
        return [
            (int(f.name.split("-candidate-")[1].split(".")[0]), f)
            for f in sorted(self.state.glob(f"stage-{stage}-candidate-*.safetensors"))
        ]

    def clear_state(self, stage: int) -> None:
        if self.writer:
            for _, f in self.stage_state(stage):
                f.unlink()
