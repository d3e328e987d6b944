"""The configuration is typed from end to end: a task's sections reach it as dataclasses, a
configuration changes section by section (checked by the one type checker), the recorded dict is
unchanged; the learning rate of every kind of stage comes from ``LrSchedule``; NT-ASGD joins the
loop through its validation hooks."""

import dataclasses

import pytest
import torch

import topdown
from topdown.config import RunConfig, TrainConfig, parse_overrides
from topdown.metrics import Metric
from topdown.optim import NTASGD, ValidationHooks, validation_hooks
from topdown.schedule import LrSchedule
from topdown.tasks import TASKS, digits, resolve_config, task_module


def test_a_tasks_sections_are_typed_and_read_as_attributes():
    cfg = resolve_config("digits", "tiny", {"model": {"layers": 2}})
    assert isinstance(cfg.task.model, digits.Model) and isinstance(cfg.task["data"], digits.Data)
    assert (cfg.task.model.hidden, cfg.task.model.layers) == (32, 2)  # the preset's, then the override
    assert [name for name, _ in digits.block_names(cfg.task.model)] == ["layer1", "layer2", "output"]
    task = digits.make(cfg.task)
    assert len(task.blocks) == 3 and isinstance(task.build_model(), torch.nn.Module)
    with pytest.raises(AttributeError, match="no config section 'decode'"):
        cfg.task.decode  # noqa: B018


def test_the_recorded_dict_reads_back_to_the_same_configuration():
    for name in TASKS:
        module = task_module(name)
        for preset in module.PRESETS:
            cfg = resolve_config(name, preset, {})
            recorded = cfg.as_dict()
            assert list(recorded) == ["train", "cascade", "procedure", *module.SECTIONS]
            again = RunConfig.from_dict(recorded, module.SECTIONS)
            assert again == cfg and again.as_dict() == recorded, (name, preset)
    with pytest.raises(topdown.ConfigError, match="unknown config section 'model'"):
        RunConfig.from_dict({"model": {"hidden": 3}})  # a task section no task declared


def test_updated_changes_typed_sections_and_checks_them_again():
    cfg = resolve_config("asr-rnn", "tiny", {})
    new = cfg.updated({"train": {"lr": 1}, "data": {"fbank": {"num_mel_bins": 40}}, "model": {"hidden": 8}})
    assert new.train.lr == 1.0 and isinstance(new.train.lr, float)  # an int given for a float
    assert (new.task.data.fbank.num_mel_bins, new.task.model.hidden) == (40, 8)
    assert new.task.data.fbank.low_freq == cfg.task.data.fbank.low_freq  # the rest of the section kept
    assert cfg.task.model.hidden == 16  # the original is unchanged
    assert new.option_defaults == cfg.option_defaults
    train = dataclasses.replace(cfg.train, epochs=7)
    assert cfg.updated({"train": train}).train is train  # a whole section
    for changes, message in [
        ({"train": {"lrr": 1}}, r"^unknown config key 'train.lrr'; known keys here: "),
        ({"decode": {"beam": -1}}, r"^decode.beam is -1; allowed: a finite number >= 0$"),
        ({"train": {"epochs": "many"}}, r"^config key 'train.epochs' expects a int, got 'many'$"),
        ({"cascade": {"splits": [1, "2"]}}, r"expects a list\[int\] or None, got \[1, '2'\]"),
        ({"data": {"fbank": 3}}, r"^config key 'data.fbank' is a section, not a value$"),
        ({"nosuch": {}}, r"^unknown config key 'nosuch'"),
        ({"train": cfg.cascade}, r"^config key 'train' is a TrainConfig"),
    ]:
        with pytest.raises(topdown.ConfigError, match=message):
            cfg.updated(changes)


def test_one_type_checker_for_the_command_line_a_dict_and_a_dataclass():
    """``--set``, ``RunConfig.from_dict`` and building a section directly say the same thing."""
    message = r"^config key 'train.lr' expects a float, got 'abc'$"
    with pytest.raises(topdown.ConfigError, match=message):
        resolve_config("digits", "tiny", parse_overrides(["train.lr=abc"]))
    with pytest.raises(topdown.ConfigError, match=message):
        RunConfig.from_dict({"train": {"lr": "abc"}})
    with pytest.raises(topdown.ConfigError, match=message):
        TrainConfig(lr="abc")


def test_lr_schedule_owns_every_stages_lr():
    config = RunConfig.from_dict({"train": {"lr": 0.01, "epochs": 5}, "cascade": {"finetune_epochs": 2}})
    assert LrSchedule.stage_recipe(config) == config.train
    finetune = LrSchedule.finetune_recipe(config)
    assert (finetune.epochs, finetune.lr) == (2, pytest.approx(0.001))  # a tenth of the stage lr
    config = config.updated({"cascade": {"lr": 0.02, "epochs": 3, "finetune_lr": 0.005}})
    assert (LrSchedule.stage_recipe(config).lr, LrSchedule.stage_recipe(config).epochs) == (0.02, 3)
    assert LrSchedule.finetune_recipe(config).lr == 0.005
    plateau = TrainConfig(epochs=4, early_stop=2, min_lr=1e-4)
    assert LrSchedule.to_the_last_epoch(plateau, 9) == plateau.replace(epochs=9, early_stop=0, min_lr=0.0)
    cosine = plateau.replace(schedule="cosine")
    assert LrSchedule.to_the_last_epoch(cosine, 9).min_lr == 1e-4  # no floor to lift
    # plateau decay: after lr_patience epochs without improvement, and only under plateau
    decay = LrSchedule(TrainConfig(lr_decay=0.5, lr_patience=2, min_lr=0.3))
    assert decay.after_epoch(1.0, 1) == (1.0, 1) and decay.after_epoch(1.0, 2) == (0.5, 0)
    assert decay.exhausted(0.25) and not decay.exhausted(0.5)
    assert LrSchedule(cosine, 10).after_epoch(1.0, 5) == (1.0, 5) and not LrSchedule(cosine, 10).exhausted(0)


def test_an_optimizer_joins_validation_through_its_hooks():
    params = [torch.nn.Parameter(torch.ones(2))]
    plain = validation_hooks(torch.optim.SGD(params, lr=0.1))
    assert type(plain) is ValidationHooks and plain.on_validation(1.0, Metric("loss", True)) is None
    nt = NTASGD(params, lr=0.1, nonmono=1)
    assert validation_hooks(nt) is nt
    loss = Metric("loss", True)
    notes = [nt.on_validation(v, loss) for v in (3.0, 2.0, 3.5)]
    assert (
        notes[:2] == [None, None] and "averaging" in notes[2]
    )  # 3.5 is worse than 3.0, the best but the last
    assert nt.averaging
