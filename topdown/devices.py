"""The device a run trains on: the default, and a clear refusal of one this PyTorch cannot use; copies
of a model's weights kept on the host; and how the command line has PyTorch allocate large CPU tensors."""

from __future__ import annotations

import os

import torch
from torch import nn

from topdown.errors import ConfigError


def available_devices() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def default_device() -> str:
    """The command line's default: the GPU if there is one. (The library's default is where the
    task's ``build_model`` puts the model: a user's ``evaluate`` may expect its data there.)"""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a ConfigError saying why this PyTorch cannot use it
    and what it can use."""
    available = ", ".join(available_devices())
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device name; available: {available}") from None
    if d.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"--device {device}: this PyTorch build has no CUDA; available: {available}")
        if not torch.cuda.is_available() or (d.index is not None and d.index >= torch.cuda.device_count()):
            raise ConfigError(f"--device {device}: no such CUDA device is visible; available: {available}")
    elif d.type != "cpu":
        try:
            torch.empty(1, device=d)
        except Exception as e:  # whatever the backend raises, the user's answer is the same
            raise ConfigError(
                f"--device {device}: this PyTorch cannot use it ({str(e).splitlines()[0][:120]}); available: "
                f"{available}"
            ) from None
    return d


def host_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state (parameters and buffers) in host memory. Weights kept while the
    model trains on (a stage's best epochs, an earlier candidate) live there, so that an accelerator
    holds one model, as a plain training step does."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def huge_pages_for_large_tensors() -> None:
    """Back CPU tensors of 2 MB and more with transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``).
    A language model's logits over its vocabulary are allocated afresh at every step; with 4 kB pages
    each allocation costs thousands of page faults, which took 30 % of an lm-awd training process's CPU
    time here (bench/RESULTS.md). PyTorch reads the variable at its first allocation, which no import
    makes, so setting it as the command line starts reaches this process and the workers it starts.
    The numbers trained do not change. A user's own setting (``THP_MEM_ALLOC_ENABLE=0``) wins."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
