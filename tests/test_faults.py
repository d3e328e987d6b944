"""A small version of the fault campaign (bench/faults.py): a random SIGKILL with --resume, and
torn or corrupt files that must be recovered from or named in one line, never a traceback."""

import platform
import re
import sys

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
