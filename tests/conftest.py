"""Shared fixtures: a toy task whose blocks include BatchNorm and dropout, and a scripted task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from topdown import Task

ROOT = Path(__file__).resolve().parents[1]
# For the tool's subprocesses: this checkout first, then whatever PYTHONPATH the tests run under.
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# One thread per process: the tiny test models are faster so, and two test processes on a
# 2-core machine do not oversubscribe it (OpenMP spin-waiting makes that very slow).
torch.set_num_threads(1)


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.mid(self.inp(x)))


def toy_data(n: int = 192, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def toy_task(metric_script: list[float] | None = None, loss_script: list[float] | None = None) -> Task:
    """A small classification task; with ``metric_script`` the validation metric of the
    k-th evaluation is scripted (to force acceptances and rejections), with ``loss_script`` its
    validation loss."""
    x, y = toy_data()
    splits = {"train": (x[:128], y[:128]), "val": (x[128:160], y[128:160]), "test": (x[160:], y[160:])}
    calls = {"val": 0}

    def train_batches(generator, subset):
        n = int(128 * subset)
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, 32):
            idx = order[i : i + 32]
            yield splits["train"][0][idx], splits["train"][1][idx]

    def loss(model, batch):
        xb, yb = batch
        return F.cross_entropy(model(xb), yb)

    def evaluate(model, split):
        xs, ys = splits[split]
        error = (model(xs).argmax(1) != ys).float().mean().item()
        cross_entropy = F.cross_entropy(model(xs), ys).item()
        if split == "val":
            k = calls["val"]
            calls["val"] += 1
            if metric_script is not None:
                error = metric_script[min(k, len(metric_script) - 1)]
            if loss_script is not None:
                cross_entropy = loss_script[min(k, len(loss_script) - 1)]
        return {"error": error, "loss": cross_entropy}

    return Task(
        name="toy",
        build_model=ToyNet,
        blocks=[("inp", ["inp"]), ("mid", ["mid"]), ("out", ["out"])],
        train_batches=train_batches,
        loss=loss,
        evaluate=evaluate,
        metric="error",
    )


@pytest.fixture
def task():
    return toy_task()


def without_seconds(obj):
    """A run record without its wall-clock fields and the list of machines that resumed it (the
    only fields that may differ between an interrupted run and an uninterrupted one)."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k not in ("seconds", "resumed_on")}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def cli(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the command-line tool in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "topdown.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# `accelerate launch` for two processes on one machine: --multi_gpu starts them through torchrun, and
# a script that asks for the CPU gets gloo (--cpu would start one process, or several through mpirun)
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes=2",
    "--num_machines=1",
    "--mixed_precision=no",
    "--dynamo_backend=no",
]


def launch(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) started by ``launcher`` (``TORCHRUN``, ``ACCELERATE``), as a user would."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "TOPDOWN_DIST_TIMEOUT": "60"}
    return subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=300)


def assert_ranks_hold_the_run(run: Path, dumps: Path, stages: list[int]) -> None:
    """Every rank of a two-process job ended each of ``stages`` with the weights rank 0 saved for it,
    and holds the chosen model at the end (``tests/jobs/ranks.py`` saved them)."""
    from topdown.files import load_tensors

    def same(dumped: Path, saved: Path) -> bool:
        a, b = torch.load(dumped), load_tensors(saved)[0]
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    for rank in (0, 1):
        for i in stages:
            assert same(
                dumps / f"stage-{i}-rank-{rank}.pt", run / "checkpoints" / f"stage-{i}.safetensors"
            ), f"rank {rank}, stage {i}"
        assert same(dumps / f"chosen-rank-{rank}.pt", run / "checkpoints" / "best.safetensors"), (
            f"rank {rank}"
        )


def stage_table(summary: dict) -> list[tuple]:
    """What a run's stages were (not what they scored): index, role, trained blocks, epochs."""
    return [(s["index"], s["role"], s["trained_blocks"], s["epochs"]) for s in summary["stages"]]
