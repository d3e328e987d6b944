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
  run record), so every decision is taken once and identically; ``from_rank_zero(model)``: rank 0's
  weights on every rank (what a stage records);
- ``wrap(model)``: a ``DistributedDataParallel`` over exactly the trainable parameters,
  built after the plan froze a stage's other blocks (frozen parameters sit in no gradient
  bucket, so no ``find_unused_parameters`` cost).
Only rank 0 writes files (``is_writer``). A trainer's launcher may start the processes before
their process group exists (torchrun for ``transformers.Trainer``, whose arguments create the group;
Lightning, which creates it inside ``fit``), and a plan is built before that: ``rank`` and
``world_size`` then come from the launcher's environment, and ``settled`` says whether the number
of processes is known yet (Lightning's main process cannot know it before it starts the others).
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


_fixed = False  # ``setup`` ran: our command line has fixed the number of processes


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    return _joined() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, or before there is one the launcher's environment's
    (torchrun sets ``RANK``; Lightning sets ``LOCAL_RANK`` and ``NODE_RANK`` for the processes it
    starts, its main process being rank 0). Before the group exists only whether it is 0 is exact."""
    if _joined():
        return dist.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return node + int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """The number of processes: the process group's, or the launcher's ``WORLD_SIZE``; 1 without either."""
    return dist.get_world_size() if _joined() else int(os.environ.get("WORLD_SIZE", "1"))


def settled() -> bool:
    """Is ``world_size`` final? Not in a plain process that no launcher started and that has no process
    group: Lightning's main process is such a process until its ``fit`` starts the others."""
    return _fixed or _joined() or "WORLD_SIZE" in os.environ


def is_writer() -> bool:
    """Rank 0: the one process that writes files and tells the user things (notes, warnings)."""
    return rank() == 0


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
    global _fixed
    _fixed = True
    if not launched() or _joined():
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


def from_rank_zero(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place. After training the ranks may differ
    where DDP does not keep them equal (BatchNorm statistics of each rank's last batch); a stage
    records rank 0's model, and every rank goes on from it."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
