"""A small version of the fault campaign (bench/faults.py): a random SIGKILL with --resume, and
torn or corrupt files that must be recovered from or named in one line, never a traceback."""

import errno
import json
import os
import platform
import re
import sys

import pytest
import torch
from conftest import ROOT

import topdown

sys.path.insert(0, str(ROOT / "bench"))
import faults  # noqa: E402


def test_fault_campaign_small(tmp_path):
    reference, duration = faults.uninterrupted(tmp_path)
    kills = faults.kill_campaign(tmp_path, reference, duration, kills=1, seed=3)
    assert kills["identical"] == 1 and kills["debris_left"] == 0 and not kills["failures"], kills
    cases = faults.corruption_cases(tmp_path, reference, duration)
    assert all(cases.values()), cases


def test_every_summary_says_where_it_was_made(tmp_path):
    from conftest import cli, read_summary

    cli(
        "baseline",
        "digits",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
        check=True,
    )
    made = read_summary(tmp_path / "run")["provenance"]
    assert (
        made["torch"] == torch.__version__
        and made["topdown"] == topdown.__version__
        and made["python"] == platform.python_version()
    )
    assert (
        made["cpu"]
        and made["threads"] == 1
        and made["device"] == "cpu"
        and made["world_size"] == 1
        and made["gpu"] is None
    )
    assert made["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", made["git_commit"])


def test_a_damaged_metrics_line_before_the_last_is_one_line_naming_the_file(tmp_path):
    from conftest import cli
    from test_cli import assert_one_line_error

    run = tmp_path / "run"
    cli("baseline", "digits", "--preset", "tiny", "--out", str(run), check=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0][:-5], *lines[1:]]) + "\n")
    assert_one_line_error(cli("report", str(run)), r"metrics.jsonl: line 1 is not a JSON record")


def _finished_cascade(run, resume=False):
    """A finished cascade of the toy model driven by a hand-written loop, recorded in ``run``."""
    from conftest import ToyNet
    from test_plan import BLOCKS, my_training, val_error

    torch.manual_seed(0)
    plan = topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=run, resume=resume)
    for stage in plan:
        my_training(stage.model, stage.trainable_parameters(), epochs=1)
        stage.finish(val={"error": val_error(stage.model)})
    return plan


@pytest.mark.parametrize("status", ["running", "complete"])
def test_a_run_killed_before_its_report_was_written_gets_it_on_resume(tmp_path, status):
    """Killed after its last stage was recorded ("running") or after it was marked complete, but
    before report.md and curves.png were written: the resume that hands out no more stages writes
    them, so a resumed run's directory holds every file an uninterrupted one does."""
    from conftest import read_summary

    run = tmp_path / "run"
    _finished_cascade(run)
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    summary = read_summary(run)
    (run / "summary.json").write_text(json.dumps({**summary, "status": status}))
    for name in ("report.md", "curves.png"):
        (run / name).unlink()
    resumed = _finished_cascade(run, resume=True)
    assert resumed.summary["status"] == "complete" and len(resumed.summary["stages"]) == 3
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == files
    assert "Status: complete." in (run / "report.md").read_text()


def test_a_run_directory_that_may_not_be_entered_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """As an unprivileged user, ``--out`` (or a run given to ``report``) under a directory without
    search permission makes ``stat`` fail with EACCES. Root ignores permissions, so the refusal is
    injected where every ``Path.exists``/``is_dir``/``is_file`` asks."""
    from pathlib import Path

    from topdown.cli import main

    locked = tmp_path / "locked"
    real_stat = Path.stat

    def stat(path, **kw):
        if str(path).startswith(f"{locked}{os.sep}"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(
        topdown.TopdownError, match=rf"^cannot open {re.escape(str(locked))}/run: Permission denied$"
    ):
        _finished_cascade(locked / "run")
    for command in (
        ["report", str(locked / "run")],
        ["baseline", "digits", "--preset", "tiny", "--out", str(locked / "run")],
    ):
        assert main(command) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.fullmatch(
            rf"topdown: error: cannot (read|open) {re.escape(str(locked))}/run: Permission denied", err[0]
        ), err
