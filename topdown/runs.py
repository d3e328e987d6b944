"""The run directory: summary, per-epoch metrics, checkpoints. Every write is atomic.

Layout (a contract other tools rely on; see docs/run-directory.md):
``summary.json``, ``metrics.jsonl``, ``checkpoints/stage-<i>.safetensors``,
``checkpoints/best.safetensors``, ``report.md``, ``curves.png``, and ``state/`` (resume
points of unfinished stages, removed once a stage is recorded).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from topdown.errors import TopdownError
from topdown.task import DATA_DIR

try:
    import fcntl
except ImportError:  # not on Windows: no directory locks there
    fcntl = None

_claimed: dict[
    str, int
] = {}  # run directories this process writes: resolved path -> the descriptor holding the lock


class WriteError(TopdownError):
    """A file could not be written (permissions, a full disk, a file where a directory should be)."""


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0] or type(e).__name__


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """sha256 of a checkpoint's content (names, dtypes, shapes, values, metadata), independent
    of how the file lays them out (safetensors does not fix the order of its header)."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """``digest`` of a checkpoint's tensors alone: which weights a run started from (``--from``),
    whatever metadata the file carries."""
    return digest(tensors, {})


def file_digest(path: Path) -> str | None:
    """``digest`` of the checkpoint at ``path``; None if it is missing or unreadable."""
    try:
        return digest(*load_tensors(path))
    except TopdownError:
        return None


DEBRIS = ".*.tmp"  # the temporary files of ``atomic_write``, left behind only by a kill mid-write


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename: readers (and a
    process killed mid-write) see the old file or the new one, never half of one. A failure
    (no permission, a full disk) is a ``WriteError`` naming the path; the old file is intact."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise WriteError(f"cannot write {path}: {_reason(e)}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save tensors (copied to contiguous CPU memory, so tied weights save fine) as safetensors;
    ``metadata`` is stored as JSON strings in the file header."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=meta))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file (no pickle, so an untrusted file runs no code)."""
    path = Path(path)
    if not path.is_file():
        raise TopdownError(f"checkpoint {path} does not exist")
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise TopdownError(f"checkpoint {path} is not a readable safetensors file ({e})") from None


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a safetensors file, without loading its tensors: ours holds JSON values;
    another tool's plain strings (e.g. ``{"format": "pt"}``) are kept as they are."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise TopdownError(f"checkpoint {path} is not a readable safetensors file ({e})") from None


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


_ABSENT = object()


def _close(a: Any, b: Any) -> bool:
    """Equal, or two floats equal to 1e-5 relative: statistics a task records (e.g. normalisation
    means) computed from the same data on another CPU differ in their last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


LOCATION_KEYS = (DATA_DIR,)  # task_info keys that say where the data is, not what it is


def first_difference(
    recorded: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any] | None = None
) -> str | None:
    """The first key of ``wanted`` whose value the run record does not share, named for an error
    message (with the dotted paths that differ inside a nested dict, e.g. ``'config' (train.lr)``);
    None if the record matches. ``defaults`` (shaped like ``wanted``, possibly sparse) gives the
    value a key the record lacks stands for: an option added after the run was recorded.
    ``task_info`` describes the data: its floats match to 1e-5 (``_close``) and where the data
    lies (``LOCATION_KEYS``) is not compared, so a run continues on another machine or after its
    corpus moved; everything else must be equal."""

    def paths(a: Any, b: Any, default: Any, prefix: str, data: bool) -> list[str]:
        if a is _ABSENT:
            a = default
        if isinstance(a, dict) and isinstance(b, dict):
            default = default if isinstance(default, dict) else {}
            return [
                p
                for k in sorted(set(a) | set(b), key=str)
                if not (data and k in LOCATION_KEYS)
                for p in paths(a.get(k, _ABSENT), b.get(k), default.get(k), f"{prefix}{k}.", data)
            ]
        return [] if (_close(a, b) if data else a == b) else [prefix.rstrip(".")]

    for key, value in wanted.items():
        if inner := paths(
            recorded.get(key, _ABSENT), value, (defaults or {}).get(key), "", key == "task_info"
        ):
            return (
                f"{key!r} ({', '.join(inner)})"
                if inner != [""]
                else f"{key!r} (recorded {recorded.get(key)!r}, now {value!r})"
            )
    return None


def stage_checkpoint(index: int) -> str:
    """The checkpoint name of stage ``index``: ``checkpoints/stage-<i>.safetensors`` (``best`` is the chosen stage's copy)."""
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
        if not self.summary_path.is_file():
            return None
        try:
            return json.loads(self.summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TopdownError(
                f"{self.summary_path} is corrupt, not a run record ({str(e).splitlines()[0][:120]})"
            ) from None
        except OSError as e:
            raise TopdownError(f"cannot read {self.summary_path}: {_reason(e)}") from None

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
                raise WriteError(f"cannot write {self.metrics_path}: {_reason(e)}") from None

    def keep_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop metric lines a resumed run will write again (epochs after its resume point)."""
        if self.writer and self.metrics_path.is_file():
            records, lines = self._metric_lines()
            kept = [r for r in records if keep(r)]
            if len(kept) == lines:
                return  # nothing to drop (nor a torn last line): write nothing (a finished run may be read-only)
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
                f"{self.path}: checkpoints {', '.join(bad)} are corrupt or missing (they do not match the checksums "
                f"in summary.json); intact: {', '.join(intact) or 'none'}. Start the run again in another directory"
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

    def claim(self) -> None:
        """Lock the directory for this process until ``release`` or the process ends, however it
        ends: a second process writing the same run (a command started again while the first still
        runs) would interleave its records and checkpoints with this one's. Claiming a directory this
        process already holds does nothing; so does a missing directory (nothing to share yet) or a
        file system without locks."""
        key = str(self.path.resolve())
        if not self.writer or fcntl is None or key in _claimed or not self.path.is_dir():
            return
        try:
            fd = os.open(key, os.O_RDONLY)
        except OSError:
            return  # unreadable: the writes that follow say what is wrong
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TopdownError(
                f"{self.path} is in use: another process is training the run there; let it finish (or stop it), "
                "or choose another output directory"
            ) from None
        except OSError:
            os.close(fd)
            return
        _claimed[key] = fd

    def release(self) -> None:
        """Let other processes write the run (it is complete, or stopped on an error)."""
        if (fd := _claimed.pop(str(self.path.resolve()), None)) is not None:
            os.close(fd)

    def load_model(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.checkpoint(name))[0]

    def state_file(self, stage: int, candidate: int) -> Path:
        return self.state / f"stage-{stage}-candidate-{candidate}.safetensors"

    def candidate_file(self, stage: int, candidate: int) -> Path:
        return self.state / f"stage-{stage}-candidate-{candidate}.result.safetensors"

    def save_candidate(
        self, stage: int, candidate: int, weights: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """A finished candidate of a stage with several (its weights and results), until the stage is recorded."""
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


@functools.cache
def loaded_commit() -> str | None:
    """The checkout's commit when this process first asked: the code it runs. Asked again later, git
    would name a newer commit while a long-lived process (a comparison's workers) still runs the old code."""
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: torch.device | None = None) -> dict[str, Any]:
    """Where a result was made: the same seed gives different numbers on different CPUs, GPUs,
    thread counts and library versions, so every run record says which."""
    import platform

    from topdown import __version__, distributed

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = device or torch.device("cpu")
    return {
        "topdown": __version__,
        "git_commit": loaded_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "world_size": distributed.world_size(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
