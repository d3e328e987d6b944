"""Built-in tasks. Each module defines ``DEFAULTS`` (its config sections), ``PRESETS``
(overrides of those defaults), ``SECTIONS`` (its sections' declared options, with their
constraints; the defaults are derived from them), ``block_names(model_cfg)``, ``build_model(sections)`` and
``make(sections, data_dir) -> Task``, where ``sections`` are the task's own config sections
(``RunConfig.task``). Modules are imported only when their task is used."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from topdown.config import METHOD_SECTIONS, RunConfig, merge, method_defaults
from topdown.errors import ConfigError
from topdown.task import Task

TASKS = {
    "asr-rnn": "topdown.tasks.asr.rnn",
    "asr-transformer": "topdown.tasks.asr.transformer",
    "digits": "topdown.tasks.digits",
    "image": "topdown.tasks.image",
    "lm-awd": "topdown.tasks.lm.awd",
}
PRESET_NAMES = ("tiny", "demo", "bench", "paper")


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks are: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def make_task(name: str, sections: dict[str, Any], data_dir: str | None) -> Task:
    """Task ``name`` over its resolved config ``sections`` (a top-level function, so that
    ``functools.partial`` of it can build the task again in a worker process)."""
    return task_module(name).make(sections, data_dir)


def resolve_config(name: str, preset: str, overrides: dict[str, Any]) -> RunConfig:
    """Method defaults, then the task's defaults, then the preset, then ``--set`` overrides, typed once."""
    module = task_module(name)
    if preset not in module.PRESETS:
        raise ConfigError(f"task {name!r} has no preset {preset!r}; presets: {', '.join(module.PRESETS)}")
    # a task's defaults for a method section are checked against it key by key; its own sections it declares whole
    base = {**method_defaults(), **{k: v for k, v in module.DEFAULTS.items() if k not in METHOD_SECTIONS}}
    base = merge(base, {k: v for k, v in module.DEFAULTS.items() if k in METHOD_SECTIONS})
    return RunConfig.from_dict(
        merge(merge(base, module.PRESETS[preset]), overrides), getattr(module, "SECTIONS", None)
    )
