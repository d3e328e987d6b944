"""The package as users meet it: ``python -m topdown`` and a version written once."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import topdown

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_topdown_is_the_command():
    command = [sys.executable, "-m", "topdown", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: topdown")
    assert "cascade" in done.stdout


def test_python_dash_m_topdown_exits_non_zero_on_bad_input():
    command = [sys.executable, "-m", "topdown", "cascade", "no-such-task"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode != 0
    assert "no-such-task" in done.stderr


def test_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("topdown") == topdown.__version__
