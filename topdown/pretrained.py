"""The weights a plan starts from (``from_checkpoint``, ``--from``): read, and loaded into the model.

A checkpoint is a safetensors file (one of a run's ``checkpoints/``, or any other) or a directory
written by ``save_pretrained`` (Hugging Face transformers' layout): ``model.safetensors``, or the
shards that ``model.safetensors.index.json`` lists. Such a directory leaves out a weight the model
ties to another (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``), so a key the checkpoint
lacks is accepted where the model's tensor under it is one the checkpoint does hold (the same
``Parameter``, or the same memory); any other difference from the model (a key missing or left
over, another shape) is refused in one line naming it, as it loads (``load_start``). That the files
are there and readable is checked before a plan writes anything (``check_start``).

Only safetensors is read (no pickle: a downloaded file runs no code), and names are used as they
are: a file whose names differ from the model's (a hub repository saved from the bare model,
without the head's prefix) is refused, where transformers' ``from_pretrained`` would rename them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topdown.errors import ConfigError, TopdownError
from topdown.files import load_tensors, read_metadata
from topdown.runs import RunDir

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files that hold the checkpoint at ``path`` (a file, or a ``save_pretrained``
    directory: its ``model.safetensors``, else the shards its index names, each checked present)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TopdownError(f"checkpoint {path} does not exist")
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    index = path / INDEX
    if not index.is_file():
        raise TopdownError(
            f"checkpoint directory {path} holds neither {SINGLE} nor {INDEX} (a directory written by "
            "save_pretrained with safetensors; pickle files such as pytorch_model.bin are not read)"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))  # in the index's order, each once
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TopdownError(f"{index} is not a readable index of shards ({type(e).__name__}: {e})") from None
    if odd := [s for s in shards if not isinstance(s, str) or Path(s).name != s]:
        raise TopdownError(f"{index} names shards outside its directory: {_listed(odd)}")
    if absent := [s for s in shards if not (path / s).is_file()]:
        raise TopdownError(f"checkpoint {path} lacks {_listed(absent)}, named by its {INDEX}")
    return [path / s for s in shards]


def read_start(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors and metadata (one of a run's checkpoints is first checked against the
    checksum its run recorded; the shards of a directory are merged)."""
    if Path(path).is_file():
        return RunDir.load_checkpoint(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for file in checkpoint_files(path):
        more, more_meta = load_tensors(file)
        if twice := [key for key in more if key in tensors]:
            raise TopdownError(f"checkpoint {path} holds {_listed(twice)} in two of its shards")
        tensors.update(more)
        meta.update(more_meta)
    return tensors, meta


def _memory(t: torch.Tensor) -> tuple[int, torch.Size] | None:
    """Where a tensor's values lie (None for an empty one, which shares nothing)."""
    return (t.data_ptr(), t.shape) if t.numel() else None


def _listed(names: list[str], shown: int = 3) -> str:
    """The first names in order (a file's header has none of its own), and how many more."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_start(path: str | Path) -> None:
    """Refuse a checkpoint that is absent, lacks a shard or has an unreadable header, from the headers
    alone (a plan checks this before it writes anything). Whether it fits the model is checked as it
    loads: the model's own load hooks may add or rename keys."""
    for file in checkpoint_files(path):
        read_metadata(file)


def load_start(model: nn.Module, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the checkpoint at ``path`` into ``model``; returns what ``read_start`` read. A key the
    model has and the checkpoint lacks is accepted only where the model's tensor under it is one the
    checkpoint did load (the same object, or the same memory): a tied weight left out of the file."""
    tensors, meta = read_start(path)
    unfit = f"checkpoint {path} does not fit the model:"
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # another shape
        lines = [line.strip() for line in str(e).strip().splitlines()[:3]]
        raise ConfigError(f"{unfit} {' '.join(lines)[:300]}") from None
    if result.unexpected_keys:
        raise ConfigError(f"{unfit} it holds {_listed(result.unexpected_keys)}, which the model has not")
    state = model.state_dict(keep_vars=True)
    missing = set(result.missing_keys)
    held = [t for key, t in state.items() if key not in missing]
    ids, memory = {id(t) for t in held}, {_memory(t) for t in held} - {None}
    if untied := [
        k for k in result.missing_keys if id(state[k]) not in ids and _memory(state[k]) not in memory
    ]:
        raise ConfigError(
            f"{unfit} it lacks {_listed(untied)} (only a weight the model ties to one the checkpoint "
            "holds may be left out)"
        )
    return tensors, meta
