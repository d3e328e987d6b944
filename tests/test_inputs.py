"""Every input a user can get wrong ends in one clear line: out-of-range values (generated from
the declared constraints, so a new option is covered when it is declared), devices, and the
file system (no permission, a full disk), with earlier results intact and resumable."""

from __future__ import annotations

import dataclasses
import errno
import math
import subprocess
import sys
import types
import typing

import pytest
from conftest import PYTHONPATH, cli, read_summary, toy_task, without_seconds
from test_cli import assert_one_line_error

import topdown
import topdown.files
from topdown.config import METHOD_SECTIONS, parse_overrides
from topdown.sections import Section
from topdown.tasks import TASKS, resolve_config, task_module

TINY_DIGITS = ["digits", "--preset", "tiny"]


def bad_values(field: dataclasses.Field, hint) -> list:
    """Values just outside a field's declared constraint (and non-finite numbers)."""
    check = field.metadata.get("check")
    if check is None:
        return []
    if check.choices is not None:
        return ["no-such-choice"]
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    lists = [typing.get_args(k)[0] for k in kinds if typing.get_origin(k) is list]
    number = int if int in kinds or int in lists else float
    out = [math.nan, math.inf] if number is float else []
    step = 1 if number is int else 0.5
    out += [b for b in (check.gt, check.lt) if b is not None]
    out += [check.ge - step] if check.ge is not None else []
    out += [check.le + step] if check.le is not None else []
    values = [number(v) if math.isfinite(v) else v for v in out]
    return [[v] for v in values] if lists else values  # a list option: each item is checked


def declared_fields(section: type[Section], prefix: str):
    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        hint = hints[f.name]
        if isinstance(hint, type) and issubclass(hint, Section):
            yield from declared_fields(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hint


def cases():
    for task in TASKS:
        sections = {**METHOD_SECTIONS, **task_module(task).SECTIONS}
        for name, section in sections.items():
            for key, f, hint in declared_fields(section, f"{name}."):
                for value in bad_values(f, hint):
                    yield task, key, value


CASES = list(cases())


def nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def test_every_declared_constraint_is_enforced_with_key_value_and_what_is_allowed():
    assert len(CASES) > 100  # every task's options and the method's
    for task, key, value in CASES:
        with pytest.raises(topdown.ConfigError) as e:
            resolve_config(task, "tiny", nested(key, value))
        message = str(e.value)
        assert key in message and "allowed" in message and "\n" not in message, (task, key, value, message)


def test_relations_between_fields():
    with pytest.raises(topdown.ConfigError, match="strictly descending"):
        resolve_config("digits", "tiny", {"cascade": {"splits": [1, 2]}})
    with pytest.raises(topdown.ConfigError, match=r"val_fraction \+ data.test_fraction must be below 1"):
        resolve_config("digits", "tiny", {"data": {"val_fraction": 0.6, "test_fraction": 0.5}})
    with pytest.raises(topdown.ConfigError, match="multiple of model.heads"):
        resolve_config("asr-transformer", "tiny", {"model": {"heads": 3}})
    with pytest.raises(topdown.ConfigError, match="cascade.splits is empty"):
        resolve_config("digits", "tiny", {"cascade": {"splits": []}})


def test_set_gives_a_string_option_the_text_as_typed_and_types_the_others():
    """YAML would read `#` as a comment, `?` as a mapping and `*` as an alias: a string option
    takes the text."""
    for text in ("#", "!", "~", "?", "*", "@", "|", "%", "<UNK>"):
        assert resolve_config("asr-rnn", "tiny", parse_overrides([f"data.unk={text}"])).task.data.unk == text
    assert (
        resolve_config("asr-rnn", "tiny", parse_overrides(["data.unk='#'"])).task.data.unk == "#"
    )  # YAML quoting still works
    cfg = resolve_config(
        "digits", "tiny", parse_overrides(["train.lr=1e-3", "cascade.splits=[2,1]", "train.monitor= loss "])
    )
    assert (cfg.train.lr, cfg.cascade.splits, cfg.train.monitor) == (0.001, [2, 1], "loss")
    assert (
        resolve_config(
            "asr-rnn", "tiny", parse_overrides(["data.fbank={num_mel_bins: 40}"])
        ).task.data.fbank.num_mel_bins
        == 40
    )
    with pytest.raises(topdown.ConfigError, match=r"^--set train.epochs: cannot parse value '\*'$"):
        resolve_config("digits", "tiny", parse_overrides(["train.epochs=*"]))
    with pytest.raises(topdown.ConfigError, match="'train.lr' expects a float, got 'abc'"):
        resolve_config("digits", "tiny", parse_overrides(["train.lr=abc"]))
    with pytest.raises(
        topdown.ConfigError, match=r"^--set train.lr.x: train.lr was given a value, so it has no keys to set$"
    ):
        parse_overrides(["train.lr=1", "train.lr.x=2"])
    with pytest.raises(
        topdown.ConfigError,
        match=r"^--set train: keys under train were set, so it cannot also be given a value$",
    ):
        parse_overrides(["train.lr=1", "train=2"])


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--set", "train.lr=-1"], r"train.lr is -1.0; allowed: a finite number >= 0"),
        (["--set", "train.lr=.nan"], r"train.lr is nan"),
        (["--set", "data.batch_size=0"], r"data.batch_size is 0; allowed"),
        (["--seed", "-1"], r"seed must be a non-negative integer"),
        (["--device", "tpu9"], r"not a device name; available: cpu"),
        (["--device", "cuda:99"], r"--device cuda:99: .*available: cpu"),
    ],
)
def test_bad_values_and_devices_are_one_line_errors_before_any_work(tmp_path, args, pattern):
    out = tmp_path / "run"
    assert_one_line_error(cli("baseline", *TINY_DIGITS, "--out", str(out), *args), pattern)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--subsets", "0.5", "1.5"], r"procedure.subset is 1.5; allowed: a finite number > 0 and < 1"),
        (["--jobs", "0"], r"--jobs must be at least 1, got 0"),
    ],
)
def test_analyse_refuses_bad_fractions_and_job_counts_before_training_its_baseline(tmp_path, args, pattern):
    out = tmp_path / "analyse"
    assert_one_line_error(cli("analyse", *TINY_DIGITS, "--out", str(out), *args), pattern)
    assert not (out / "runs").exists()


def test_bad_output_locations(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    assert_one_line_error(
        cli("baseline", *TINY_DIGITS, "--out", str(a_file)), "is a file, not a run directory"
    )
    assert_one_line_error(
        cli("baseline", *TINY_DIGITS, "--out", str(a_file / "under")),
        r"cannot write .*file/under/summary.json: Not a directory",
    )
    assert a_file.read_text() == "mine"
    assert_one_line_error(
        cli("baseline", *TINY_DIGITS, "--out", str(tmp_path / "new"), "--resume"), "nothing to resume"
    )
    corrupt = tmp_path / "corrupt"
    cli("baseline", *TINY_DIGITS, "--out", str(corrupt), check=True)
    (corrupt / "summary.json").write_bytes(b"\xff\xfe{ not json")
    assert_one_line_error(
        cli("baseline", *TINY_DIGITS, "--out", str(corrupt), "--resume"), "summary.json is corrupt"
    )
    assert_one_line_error(cli("report", str(corrupt)), "summary.json is corrupt")


READ_ONLY = """
import errno, os, sys, tempfile
import topdown.files
real = tempfile.mkstemp
def refuse(*a, dir=None, **k):
    if str(dir).startswith(sys.argv[1]):
        raise PermissionError(errno.EACCES, "Permission denied")
    return real(*a, dir=dir, **k)
topdown.files.tempfile.mkstemp = refuse
from topdown.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_read_only_run_still_reports_and_resumes_and_a_new_run_says_why_not(tmp_path):
    """Root ignores file permissions, so the refusal is injected where every file is written."""
    run = tmp_path / "run"
    cli("cascade", *TINY_DIGITS, "--out", str(run), check=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def read_only(*args):
        return subprocess.run(
            [sys.executable, "-c", READ_ONLY, str(tmp_path), *args],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"},
        )

    proc = read_only("report", str(run))
    assert "| stage |" in proc.stdout  # the table, although the files cannot be rewritten
    assert_one_line_error(proc, r"cannot write .*run/curves.png: Permission denied")
    resumed = read_only("cascade", *TINY_DIGITS, "--out", str(run), "--resume")
    assert resumed.returncode == 0 and "chosen stage" in resumed.stdout, resumed.stderr
    assert_one_line_error(
        read_only("baseline", *TINY_DIGITS, "--out", str(tmp_path / "new")),
        r"cannot write .*new/summary.json: Permission denied",
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_full_disk_mid_run_keeps_what_was_saved_and_resume_finishes_identically(tmp_path, monkeypatch):
    train = topdown.TrainConfig(epochs=2, lr=0.01)
    reference = topdown.cascade(toy_task(), tmp_path / "reference", train=train, seed=1)
    real, calls = topdown.files.save_file, {"n": 0}

    def fills_up(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:  # a few resume points and the stage-0 checkpoints fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(topdown.files, "save_file", fills_up)
    run = tmp_path / "run"
    with pytest.raises(topdown.TopdownError, match=r"cannot write .*\.safetensors: No space left on device"):
        topdown.cascade(toy_task(), run, train=train, seed=1)
    saved = read_summary(run)
    assert saved["stages"] and saved["status"] in ("running", "failed")
    assert not list(run.rglob("*.tmp"))
    monkeypatch.setattr(topdown.files, "save_file", real)  # space freed
    resumed = topdown.cascade(toy_task(), run, train=train, seed=1, resume=True)
    assert without_seconds(resumed) == without_seconds(reference)


def test_a_damaged_compressed_corpus_file_is_a_data_error_naming_it(tmp_path):
    """The bundled WikiText splits are .gz files: a truncated or corrupted copy is one line, not a
    zlib traceback."""
    import gzip

    from topdown.task import text_lines

    whole = gzip.compress(b"a line of text\n" * 200)
    for name, damaged in (
        ("truncated.gz", whole[:-12]),
        ("crc.gz", whole[:20] + bytes(20) + whole[40:]),
        ("deflate.gz", whole[:10] + b"\xff" * 4 + whole[14:]),
    ):  # EOFError, BadGzipFile, zlib.error
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(topdown.DataError, match=rf"{name}: cannot read it \("):
            text_lines(tmp_path / name)
    (tmp_path / "whole.gz").write_bytes(whole)
    assert text_lines(tmp_path / "whole.gz") == ["a line of text"] * 200
