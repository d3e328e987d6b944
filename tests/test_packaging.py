"""The package as users meet it: ``python -m topdown`` and a version written once."""

import ast
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


def test_the_build_reads_the_version_without_importing_the_package():
    """setuptools reads ``attr`` statically only from a module that assigns the string itself; otherwise it
    imports the package, which needs torch in the build environment, and a clean install fails."""
    tomllib = pytest.importorskip("tomllib")
    attr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"][
        "attr"
    ]
    module, name = attr.rsplit(".", 1)
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    assert isinstance(assigned.get(name), ast.Constant) and assigned[name].value == topdown.__version__
