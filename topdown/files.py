"""Files a run is made of: atomic writes, safetensors checkpoints and their content digests.

Every write goes through ``atomic_write``: a reader, or a process killed mid-write, sees the old
file or the new one, never half of one; a failure is a one-line ``WriteError`` naming the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from topdown.errors import TopdownError


class WriteError(TopdownError):
    """A file could not be written (permissions, a full disk, a file where a directory should be)."""


def os_reason(e: Exception) -> str:
    """The system's reason for an ``OSError`` (``Permission denied``), for a one-line message."""
    return getattr(e, "strerror", None) or str(e).splitlines()[0] or type(e).__name__


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
        raise WriteError(f"cannot write {path}: {os_reason(e)}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save tensors as safetensors, from contiguous CPU memory; ``metadata`` is stored as JSON
    strings in the file header. A tensor whose memory an earlier one holds (a tied weight) is
    saved from a copy of its own, since safetensors refuses shared memory; the others are not
    copied, so saving a model on the CPU does not hold a second one."""
    flat, held = {}, set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        memory = t.untyped_storage().data_ptr()
        flat[key] = t.clone() if memory in held else t
        held.add(memory)
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
