"""``--executor``: a comparison's runs on Ray (a local instance) and through submitit (its local
executor, and the sbatch script it would submit on a SLURM cluster) give the numbers of one
process; the executor options' bad input is one line."""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
from conftest import without_seconds

from topdown import cli, executors
from topdown.arguments import parser
from topdown.compare import run_compare
from topdown.errors import ConfigError, TrainingError
from topdown.executors import Ray, Slurm
from topdown.procedures import run_or_resume
from topdown.tasks import make_task, resolve_config

CONFIG = resolve_config("digits", "tiny", {"cascade": {"splits": [1]}})  # one cascade stage: 3 runs a seed
FACTORY = functools.partial(make_task, "digits", CONFIG.task, None)


def _without_seconds(record: dict) -> dict:
    """compare.json without the wall-clock times (the only numbers that differ between two runs)."""
    return json.loads(
        json.dumps(record), object_hook=lambda d: {k: v for k, v in d.items() if k != "seconds"}
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The comparison in this process at one thread (``--jobs 1``)."""
    return run_compare(FACTORY(), tmp_path_factory.mktemp("one"), seeds=2, config=CONFIG, preset="tiny")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    tests = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    # the workers import this module's functions (by name) and topdown
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": tests}},
    )
    yield ray
    ray.shutdown()


def test_a_comparison_on_ray_equals_one_process(ray_instance, one_process, tmp_path):
    out = tmp_path / "cmp"
    record = run_compare(
        FACTORY(), out, seeds=2, config=CONFIG, preset="tiny", executor=Ray(), task_factory=FACTORY
    )
    assert _without_seconds(record) == _without_seconds(one_process)
    assert len(list((out / "runs").iterdir())) == 6


def _dies_in_its_first_attempt(task, out: Path, marker: Path) -> dict:
    """Train a baseline in ``out``; the first attempt's process dies after two saved epochs (as a
    node that is lost would), holding the run's lock."""
    if not marker.exists():
        marker.touch()
        evaluate, calls = task.evaluate, []

        def dies(model, split):
            calls.append(split)
            if len(calls) == 3:  # epoch 3's validation: epochs 1 and 2 saved
                os._exit(1)
            return evaluate(model, split)

        task.evaluate = dies
    return run_or_resume("baseline", task, out, config=CONFIG, preset="tiny")


def _refuses(task) -> None:
    raise ConfigError("a refusal, said in the worker")


def _dies(task) -> None:
    os._exit(1)


def test_a_ray_task_whose_worker_died_is_retried_and_resumes_its_run(ray_instance, tmp_path):
    whole = run_or_resume("baseline", FACTORY(), tmp_path / "whole", config=CONFIG, preset="tiny")
    run = tmp_path / "cut"
    with Ray().open(FACTORY(), FACTORY) as workers:
        again = workers.submit(_dies_in_its_first_attempt, run, tmp_path / "marker").result()
        refused = workers.submit(_refuses).exception()
    assert len(again["resumed_on"]) == 1  # resumed once, by the retried task, from the saved epochs
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert without_seconds(again) == without_seconds({**whole, "resumed_on": again["resumed_on"]})
    # an error the run reports as one line comes back as itself, not wrapped in Ray's
    assert type(refused) is ConfigError and str(refused) == "a refusal, said in the worker"
    with pytest.raises(TrainingError, match=r"a Ray worker ended abruptly.* run the same command again"):
        with Ray(max_retries=0).open(FACTORY(), FACTORY) as workers:
            workers.submit(_dies).result()


def test_a_comparison_through_submitit_equals_one_process(one_process, tmp_path):
    """Its seed 0 (each job a process of its own, started by submitit's local executor)."""
    pytest.importorskip("submitit")
    out = tmp_path / "cmp"
    slurm = Slurm(out / "slurm", local=True)
    record = run_compare(
        FACTORY(), out, seeds=1, config=CONFIG, preset="tiny", executor=slurm, task_factory=FACTORY
    )
    assert {arm: _without_seconds(r["per_seed"]) for arm, r in record["arms"].items()} == {
        arm: _without_seconds(r["per_seed"][:1]) for arm, r in one_process["arms"].items()
    }
    assert len(list((out / "slurm").glob("*_log.err"))) == 3, "submitit's logs of the 3 runs are in DIR/slurm"


def test_a_slurm_job_that_ended_without_a_result_is_one_line(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    tests = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", tests)  # the job imports _dies from this module
    # submitit's own tests do so: it waits 15 s for a result file a shared file system may show late
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)
    with pytest.raises(TrainingError, match=r"SLURM job \d+ ended without a result .*_log\.err\); finished"):
        with Slurm(tmp_path / "slurm", local=True).open(FACTORY(), FACTORY) as workers:
            workers.submit(_dies).result()


def _fake_sbatch(tmp_path: Path, monkeypatch) -> None:
    """An ``sbatch`` on PATH, so that the options are read as on a SLURM login node."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


def test_the_slurm_options_become_the_sbatch_script_of_every_job(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    _fake_sbatch(tmp_path, monkeypatch)
    argv = ["compare", "digits", "--seeds", "2", "--executor", "slurm", "--slurm-partition", "cpu"]
    argv += ["--slurm-time", "90", "--cpus-per-run", "2", "--slurm-option", "account=proj"]
    argv += ["--slurm-option", "gres=gpu:1"]
    executor = executors.from_args(parser().parse_args(argv), tmp_path / "out", FACTORY)
    assert executor == Slurm(tmp_path / "out" / "slurm", "cpu", 90, 2, {"account": "proj", "gres": "gpu:1"})
    script = _make_sbatch_string(
        command="python -m x", folder=executor.folder, **executor.sbatch_parameters()
    )
    flags = set(re.findall(r"^#SBATCH (--\S+)$", script, re.M))
    assert {
        "--partition=cpu",
        "--time=90",
        "--cpus-per-task=2",
        "--account=proj",
        "--gres=gpu:1",
        "--job-name=topdown",
    } <= flags
    assert f"--output={tmp_path / 'out' / 'slurm'}/%j_0_log.out" in flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--executor", "ray", "--address", "127.0.0.1:{port}"],
            r"--address 127\.0\.0\.1:\d+: cannot reach it",
        ),
        (["--executor", "ray", "--address", "nowhere"], r"--address nowhere: expected HOST:PORT"),
        (["--executor", "ray", "--jobs", "2"], r"--jobs: not an option of --executor ray"),
        (["--executor", "ray", "--cpus-per-run", "0"], r"--cpus-per-run must be at least 1, got 0"),
        (["--address", "h:1"], r"--address: not an option of --executor local"),
        (["--executor", "slurm"], r"--executor slurm: no sbatch on PATH .*--slurm-local"),
        (
            ["--executor", "slurm", "--slurm-local", "--slurm-option", "x"],
            r"--slurm-option x: expected KEY=VALUE",
        ),
        (
            ["--executor", "slurm", "--slurm-local", "--slurm-time", "0"],
            r"--slurm-time must be at least 1 minute",
        ),
    ],
)
def test_bad_executor_options_are_one_line_before_anything_runs(
    options, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    options = [o.format(port=_free_port()) for o in options]
    out = tmp_path / "cmp"
    assert (
        cli.main(["compare", "digits", "--preset", "tiny", "--seeds", "2", "--out", str(out), *options]) == 1
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(f"topdown: error: {message}.*", lines[0]), lines
    assert not out.exists()


@pytest.mark.parametrize(("executor", "module"), [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_extra_is_one_line_naming_it(executor, module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as where the extra is not installed
    out = tmp_path / "cmp"
    argv = [
        "analyse",
        "digits",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--executor",
        executor,
        "--slurm-local",
    ]
    assert cli.main(argv if executor == "slurm" else argv[:-1]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f'topdown: error: --executor needs {module}, which is not installed: pip install "topdown[cluster]"'
    ]
    assert not out.exists()


PARENT = """
import multiprocessing, sys, time
from topdown.jobs import Workers


def no_task():
    return None


def sleep(task):
    time.sleep(600)


if __name__ == "__main__":
    with Workers(None, 2, no_task) as workers:
        futures = [workers.submit(sleep) for _ in range(2)]
        while len(multiprocessing.active_children()) < 2:
            time.sleep(0.05)
        print(*[p.pid for p in multiprocessing.active_children()], flush=True)
        futures[0].result()
"""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_workers_end_when_the_command_is_killed(tmp_path):
    """`--jobs N` workers outlive a command killed from outside (kill PID, the out-of-memory killer);
    ours end within seconds, so none trains on holding its run's lock against the command run again."""
    import signal
    import subprocess
    import time

    (tmp_path / "parent.py").write_text(PARENT)
    parent = subprocess.Popen([sys.executable, "parent.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        parent.kill()
        for pid in workers if "workers" in locals() else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
