"""Built-in tasks. Each module defines ``SECTIONS`` (its own config sections as typed ``Section``
classes, ``topdown.sections``, each option with its constraint), ``DEFAULTS`` (the task's changes
to the declared defaults, of its sections and of the method's), ``PRESETS`` (changes on top of
those), ``block_names(model)``, ``build_model(sections)`` and ``make(sections, data_dir) -> Task``,
where ``sections`` are the task's typed sections (``RunConfig.task``: ``sections.model.hidden``)
and ``model`` is its ``model`` section. Each task's ``data`` section derives ``regime.Regime``: the
training-regime keys every task shares (``data.fraction``, ``data.label_noise``, ``data.augment``).
Modules are imported only when their task is used."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from topdown.config import RunConfig, load_config_file
from topdown.errors import ConfigError
from topdown.sections import TaskSections
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


def make_task(name: str, sections: TaskSections, data_dir: str | None) -> Task:
    """Task ``name`` over its resolved config ``sections`` (a top-level function, so that
    ``functools.partial`` of it can build the task again in a worker process)."""
    return task_module(name).make(sections, data_dir)


def resolve_config(
    name: str, preset: str, overrides: dict[str, Any], config_file: str | None = None
) -> RunConfig:
    """Every declared default, then the task's defaults, then the preset, then the ``--config`` file
    (``config_file``), then ``--set`` overrides, each layer applied to the typed configuration
    (``RunConfig.updated``); an error in the file names the file."""
    module = task_module(name)
    if preset not in module.PRESETS:
        raise ConfigError(f"task {name!r} has no preset {preset!r}; presets: {', '.join(module.PRESETS)}")
    config = RunConfig.from_dict({}, module.SECTIONS)
    for layer in (module.DEFAULTS, module.PRESETS[preset]):
        config = config.updated(layer)
    if config_file is not None:
        layer = load_config_file(config_file)
        try:
            config = config.updated(layer)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from None
    return config.updated(overrides)
