"""Data-parallel stages under ``torchrun`` (or ``topdown ... --nproc N``): one process per rank.

What the rest of the code needs from ``torch.distributed``, in one place:
- ``launch(argv, nproc, device)``: ``topdown ... --nproc N`` started again as N processes under
  torchrun;
- ``setup(device)``: join the process group that ``torchrun`` describes in the environment
  (gloo on CPU, NCCL on CUDA; each rank its own GPU) — a no-op in a single process;
- ``shard(batches)``: this rank's share of an epoch's batches. Every rank draws the same
  shuffled sequence (same seed) and takes every world-th batch; a last incomplete round is
  dropped, so every rank takes the same number of optimizer steps;
- ``same_on_every_rank(obj)``: rank 0's value of ``obj`` on every rank (validation metrics, a
  run record), so every decision is taken once and identically;
- ``wrap(model)``: a ``DistributedDataParallel`` over exactly the trainable parameters,
  built after the plan froze a stage's other blocks (frozen parameters sit in no gradient
  bucket, so no ``find_unused_parameters`` cost).
Only rank 0 writes files (``is_writer``).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import distributed as dist
from torch import nn

from topdown.errors import ConfigError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(
    seconds=int(os.environ.get("TOPDOWN_DIST_TIMEOUT", "300"))
)  # a dead peer ends a collective by then


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    return rank() == 0


def speaks() -> bool:
    """Whether this process tells the user things (notes, warnings): rank 0 only, known from
    torchrun's environment even before the process group is joined."""
    return is_writer() and os.environ.get("RANK", "0") == "0"


def launched() -> bool:
    """Started by torchrun (or ``--nproc``) with more than one process?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(argv: list[str], nproc: int, device: torch.device) -> int:
    """``topdown ... --nproc N``: the same command line (``argv``, less ``--nproc``) in N processes under
    torch.distributed.run (torchrun); returns its exit status."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {nproc} on CUDA needs a GPU per process; {torch.cuda.device_count()} visible (use "
            "--device cpu for gloo processes)"
        )
    rest = [
        a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "topdown.cli",
        *rest,
    ]
    return subprocess.run(cmd).returncode


def setup(device: torch.device | None) -> torch.device | None:
    """Join torchrun's process group if there is one; returns this rank's device."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local} of this machine has no GPU of its own: {torch.cuda.device_count()} "
                f"visible, {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes; start at most that many, "
                "or use --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    return device


def shard(batches: Iterable[T]) -> Iterator[T]:
    if not active():
        yield from batches
        return
    me, n = rank(), world_size()
    round_: list[T] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == n:
            yield round_[me]
            round_ = []


def same_on_every_rank(obj: Any) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
