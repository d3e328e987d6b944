"""``--config FILE.yaml``: a run's options in a file, layered under ``--set``; every run directory's
``config.yaml`` runs that run again."""

import re

import pytest
import yaml
from conftest import cli, read_summary
from test_cli import TINY_DIGITS, assert_one_line_error

from topdown.config import parse_overrides
from topdown.errors import ConfigError
from topdown.tasks import resolve_config


def test_the_file_is_over_the_preset_and_under_set(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 2\ncascade: {splits: [2, 1]}\n")
    preset = resolve_config("digits", "tiny", {})
    from_file = resolve_config("digits", "tiny", {}, str(path))
    assert (from_file.train.lr, from_file.train.epochs, from_file.cascade.splits) == (0.001, 2, [2, 1])
    # a file of some sections leaves every other key as the preset has it
    assert (
        from_file.updated({"train": {"lr": preset.train.lr, "epochs": preset.train.epochs}}).updated(
            {"cascade": {"splits": None}}
        )
        == preset
    )
    both = resolve_config("digits", "tiny", parse_overrides(["train.epochs=4"]), str(path))
    assert (both.train.epochs, both.train.lr) == (4, 0.001)  # --set wins; the file's other keys stay
    path.write_text("")
    assert resolve_config("digits", "tiny", {}, str(path)) == preset  # an empty file changes nothing


@pytest.mark.parametrize(
    "text, pattern",
    [
        (None, r"cannot read the config file: No such file"),
        ("train: {lr: 0.01\n", r"not YAML at line 2: "),
        ("- train\n", r"expected a mapping of config sections .*got a list"),
        ("train: {lrr: 0.1}\n", r"unknown config key 'train\.lrr'; known keys here: .*lr, lr_decay"),
        ("trian: {lr: 0.1}\n", r"unknown config key 'trian'; known keys here: train, cascade"),
        ("train: {epochs: many}\n", r"config key 'train\.epochs' expects a int, got 'many'"),
        ("train: {lr: -1}\n", r"train\.lr is -1\.0; allowed: a finite number >= 0"),
        ("train: 5\n", r"config key 'train' is a section, not a value"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {pattern}"):
        resolve_config("digits", "tiny", {}, str(path))
    if text in (None, "train: {lrr: 0.1}\n"):  # from the command line too, before anything is written
        proc = cli("baseline", *TINY_DIGITS, "--config", str(path), "--out", str(tmp_path / "r"))
        assert_one_line_error(proc, f"{re.escape(str(path))}: {pattern}")
        assert not (tmp_path / "r").exists()


def test_a_runs_config_yaml_runs_it_again_and_an_old_run_resumes(tmp_path):
    options = tmp_path / "options.yaml"
    options.write_text("train: {lr: 0.002}\ncascade: {splits: [2]}\n")
    run = tmp_path / "run"
    made = ["cascade", *TINY_DIGITS, "--config", str(options), "--set", "train.epochs=2", "--out", str(run)]
    cli(*made, check=True)
    summary = read_summary(run)
    assert (summary["config"]["train"]["lr"], summary["config"]["train"]["epochs"]) == (0.002, 2)
    assert summary["config"]["cascade"]["splits"] == [2]
    assert yaml.safe_load((run / "config.yaml").read_text()) == summary["config"]
    # without --preset (demo) or --set: the file alone is the whole configuration
    again = tmp_path / "again"
    cli("cascade", "digits", "--config", str(run / "config.yaml"), "--out", str(again), check=True)
    assert read_summary(again)["config"] == summary["config"]
    assert (again / "config.yaml").read_text() == (run / "config.yaml").read_text()
    # a run made before config.yaml existed resumes, and gains the file
    (run / "config.yaml").unlink()
    cli(*made, "--resume", check=True)
    assert yaml.safe_load((run / "config.yaml").read_text()) == summary["config"]
    assert read_summary(run)["stages"] == summary["stages"]
