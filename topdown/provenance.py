"""Where a result was made: the same seed gives different numbers on different CPUs, GPUs,
thread counts and library versions, so every run record says which."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from topdown import distributed
from topdown.version import __version__


@functools.cache
def loaded_commit() -> str | None:
    """The checkout's commit when this process first asked: the code it runs. Asked again later, git
    would name a newer commit while a long-lived process (a comparison's workers) still runs the old code."""
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
    """The machine, versions and process count a run record names (``provenance``, ``resumed_on``)."""
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
        # None until known: a process no launcher started yet may still become several (``record.agree``)
        "world_size": distributed.world_size() if distributed.settled() else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
