"""The device a run trains on: the default, and a clear refusal of one this PyTorch cannot use."""

from __future__ import annotations

import torch

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
