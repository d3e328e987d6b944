"""Finished runs kept as one compressed archive (``runs.tar.xz``) instead of hundreds of loose files.

A run's record is the text it leaves directly in its directory (``summary.json``, the per-epoch
``metrics.jsonl``, ``report.md`` and any other ``.json``/``.jsonl``/``.md`` file there), never a
checkpoint. ``pack_runs`` writes the records of a directory's finished runs into an archive, the same
bytes for the same files (members sorted, no dates or owners), so that packing again changes nothing
that did not change. ``restore_runs`` puts them back under a comparison's ``runs/``, where ``compare``
reuses a finished run from its summary alone (``topdown compare --runs-from``). A sweep's archive
holds every cell's runs, ``DIR/cells/CELL/runs/RUN/FILE`` as ``cells/CELL/runs/RUN/FILE``
(``pack_sweep``, ``restore_sweep``; ``topdown sweep --runs-from``).
"""

from __future__ import annotations

import io
import json
import lzma
import os
import tarfile
from pathlib import Path

from topdown.errors import DataError

RECORD_SUFFIXES = (".json", ".jsonl", ".md")
COMPARE_PREFIX = "runs/"  # a comparison's archive holds its DIR/runs/RUN/FILE as runs/RUN/FILE
SWEEP_PREFIX = "cells/"  # a sweep's, its DIR/cells/CELL/runs/RUN/FILE as cells/CELL/runs/RUN/FILE


def run_record(run: Path) -> dict[str, bytes]:
    """The files of run directory ``run`` that an archive keeps: name -> content."""
    return {
        f.name: f.read_bytes() for f in sorted(run.iterdir()) if f.is_file() and f.suffix in RECORD_SUFFIXES
    }


def _finished(summary: bytes, where: str) -> bool:
    try:
        return json.loads(summary).get("status") == "complete"
    except (ValueError, AttributeError) as e:
        raise DataError(f"{where}: not a readable summary.json ({e})") from None


def read_archive(archive: Path) -> dict[str, bytes]:
    """Every member of ``archive``: path -> content. Only plain files with relative paths inside it."""
    try:
        with tarfile.open(archive, "r:xz") as tar:
            members = {}
            for m in tar.getmembers():
                parts = m.name.split("/")
                if not m.isfile() or m.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
                    raise DataError(f"{archive}: member {m.name!r} is not a plain file inside the archive")
                members[m.name] = tar.extractfile(m).read()
            return members
    except (OSError, tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise DataError(f"{archive}: not a readable runs archive (.tar.xz): {e}") from None


def write_archive(archive: Path, members: dict[str, bytes]) -> None:
    """``archive`` holding ``members`` (path -> content), byte for byte the same for the same members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(members[name]))
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    partial.write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    os.replace(partial, archive)


def pack_runs(source: Path, archive: Path, prefix: str = "") -> list[str]:
    """Add to ``archive`` (created if absent) the record of every finished run directly under
    ``source`` as ``prefix + RUN/FILE``; a run already in the archive is replaced by ``source``'s,
    every other member kept. Returns the names of the runs packed."""
    source, archive = Path(source), Path(archive)
    if not source.is_dir():
        raise DataError(f"{source}: no such directory of runs")
    members = read_archive(archive) if archive.exists() else {}
    packed = []
    for run in sorted(p for p in source.iterdir() if (p / "summary.json").is_file()):
        record = run_record(run)
        if not _finished(record["summary.json"], str(run / "summary.json")):
            continue
        for name in [m for m in members if m.startswith(f"{prefix}{run.name}/")]:
            del members[name]
        members.update({f"{prefix}{run.name}/{name}": data for name, data in record.items()})
        packed.append(run.name)
    write_archive(archive, members)
    return packed


def pack_sweep(source: Path, archive: Path) -> list[str]:
    """Add to ``archive`` the record of every finished run of every cell of the sweep in ``source``
    (its ``cells/CELL/runs``), as ``cells/CELL/runs/RUN/FILE``. Returns ``CELL/RUN`` per run packed."""
    cells = sorted(p for p in (Path(source) / "cells").glob("*/runs") if p.is_dir())
    if not cells:
        raise DataError(f"{source}: not a sweep's directory (no cells/*/runs)")
    return [
        f"{runs.parent.name}/{run}"
        for runs in cells
        for run in pack_runs(runs, archive, f"{SWEEP_PREFIX}{runs.parent.name}/{COMPARE_PREFIX}")
    ]


def restore_runs(source: str | Path, runs: Path) -> list[str]:
    """Into ``runs`` (a comparison's ``DIR/runs``), the record of each finished run of ``source``
    that ``runs`` does not hold yet; ``source`` is a comparison's runs archive or a directory laid out
    like ``DIR/runs``. Returns the names of the runs restored."""
    source = Path(source)
    if source.is_dir():
        found = {p.name: run_record(p) for p in sorted(source.iterdir()) if (p / "summary.json").is_file()}
    elif source.is_file():
        found = {}
        for name, data in read_archive(source).items():
            parts = name.split("/")
            if len(parts) != 3 or f"{parts[0]}/" != COMPARE_PREFIX:
                raise DataError(f"{source}: member {name!r} is not {COMPARE_PREFIX}RUN/FILE")
            found.setdefault(parts[1], {})[parts[2]] = data
    else:
        raise DataError(f"--runs-from {source}: no such archive or directory")
    if not found:
        raise DataError(
            f"--runs-from {source}: no runs in it (a runs archive, or a directory of run directories)"
        )
    return _restore(found, runs, str(source))


def restore_sweep(source: str | Path, out: Path) -> list[str]:
    """Into the sweep directory ``out``, the record of each finished run of ``source`` that its cell
    does not hold yet; ``source`` is a sweep's runs archive (``pack_sweep``) or another sweep's
    directory. Returns ``CELL/RUN`` per run restored."""
    source = Path(source)
    found: dict[str, dict[str, dict[str, bytes]]] = {}  # cell -> run -> file -> content
    if source.is_dir():
        for run in sorted((source / "cells").glob("*/runs/*/summary.json")):
            found.setdefault(run.parents[2].name, {})[run.parent.name] = run_record(run.parent)
    elif source.is_file():
        for name, data in read_archive(source).items():
            parts = name.split("/")
            if len(parts) != 5 or f"{parts[0]}/" != SWEEP_PREFIX or f"{parts[2]}/" != COMPARE_PREFIX:
                raise DataError(
                    f"{source}: member {name!r} is not {SWEEP_PREFIX}CELL/{COMPARE_PREFIX}RUN/FILE"
                )
            found.setdefault(parts[1], {}).setdefault(parts[3], {})[parts[4]] = data
    else:
        raise DataError(f"--runs-from {source}: no such archive or directory")
    if not found:
        raise DataError(
            f"--runs-from {source}: no runs in it (a sweep's runs archive, or a sweep's directory)"
        )
    return [
        f"{cell}/{run}"
        for cell, runs in found.items()
        for run in _restore(runs, Path(out) / "cells" / cell / "runs", f"{source}: {cell}")
    ]


def _restore(found: dict[str, dict[str, bytes]], runs: Path, source: str) -> list[str]:
    """Each finished run of ``found`` (run -> file -> content) that ``runs`` lacks, written there whole
    (into a hidden directory first, renamed into place)."""
    restored = []
    for run, record in found.items():
        if "summary.json" not in record or not _finished(record["summary.json"], f"{source}: {run}"):
            continue
        if (runs / run).exists():
            continue
        partial = runs / f".{run}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        for name, data in record.items():
            (partial / name).write_bytes(data)
        partial.rename(runs / run)
        restored.append(run)
    return restored
