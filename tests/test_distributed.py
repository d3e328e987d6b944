"""Data-parallel stages: two CPU processes (gloo) under torch.distributed.run, as ``--nproc 2``
or ``torchrun --nproc_per_node=2 -m topdown ...`` start them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import (
    PYTHONPATH,
    ROOT,
    TORCHRUN,
    assert_ranks_hold_the_run,
    cli,
    launch,
    read_summary,
    stage_table,
    toy_task,
    without_seconds,
)
from test_cli import assert_one_line_error

from topdown.errors import TrainingError
from topdown.executors import Local, in_parallel
from topdown.files import load_tensors

DIGITS = [
    "digits",
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--set",
    "train.epochs=12",
    "--set",
    "cascade.splits=[3]",
]


def test_two_processes_give_the_same_stage_table_and_close_numbers(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cli("cascade", *DIGITS, "--out", str(one), check=True)
    proc = cli("cascade", *DIGITS, "--out", str(two), "--nproc", "2", check=True)
    assert proc.stdout.count("| 0 ") == 1  # only rank 0 prints the table
    a, b = read_summary(one), read_summary(two)
    assert (
        b["status"] == "complete"
        and b["provenance"]["world_size"] == 2
        and a["provenance"]["world_size"] == 1
    )

    def shape(s):
        return [(x["index"], x["role"], x["split"], x["trained_blocks"], x["epochs"]) for x in s["stages"]]

    assert shape(a) == shape(b)
    for x, y in zip(a["stages"], b["stages"]):
        assert (
            abs(x["val"]["error"] - y["val"]["error"]) < 0.05
            and abs(x["test"]["error"] - y["test"]["error"]) < 0.05
        )
    assert not list(two.rglob("*.tmp")) and not list((two / "state").glob("*"))


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    run = tmp_path / "run"
    cli("baseline", *DIGITS, "--out", str(run), "--nproc", "2", check=True)
    summary = read_summary(run)
    summary["status"] = "running"  # as a run interrupted mid-stage leaves it
    (run / "summary.json").write_text(json.dumps(summary))
    assert_one_line_error(
        cli("baseline", *DIGITS, "--out", str(run), "--resume"),
        r"trained by 2 process\(es\).*has 1; resume with the same number",
    )


FAILING_RANK = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import topdown
    from conftest import toy_task
    task = toy_task()
    loss = task.loss
    def failing(model, batch, calls=[0]):
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] > 12:  # rank 1 fails in stage 1; rank 0 is waiting for it
            raise RuntimeError("rank 1 dies")
        return loss(model, batch)
    task.loss = failing
    topdown.cascade(task, sys.argv[1], train=topdown.TrainConfig(epochs=3, lr=0.01))
""")


def test_a_rank_that_fails_brings_the_others_down_and_finished_stages_stay(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(FAILING_RANK.format(tests=str(ROOT / "tests")))
    started = time.perf_counter()
    proc = launch(TORCHRUN, str(script), str(tmp_path / "run"))
    assert proc.returncode != 0 and time.perf_counter() - started < 120
    summary = read_summary(tmp_path / "run")
    assert (
        summary["stages"][0]["index"] == 0
        and (tmp_path / "run" / "checkpoints" / "stage-0.safetensors").is_file()
    )


def test_a_ddp_loop_of_ones_own_runs_a_plan_with_one_writer_and_resumes_after_a_rank_dies(tmp_path):
    """examples/ddp_loop.py, the recipe of docs/trainers.md: torchrun, init_process_group, a
    DistributedDataParallel per stage, stage.finish. A second writer would be refused (the run's lock).
    Then the same run with rank 1 dying after stage 1: torchrun brings rank 0 down, stages 0 and 1
    stay, and torchrun with two processes resumes it to the record and the chosen model of the run
    that was not interrupted."""
    whole, run, dumps = tmp_path / "whole", tmp_path / "run", tmp_path / "dumps"
    ranks = [str(ROOT / "tests" / "jobs" / "ranks.py")]
    example = [str(ROOT / "examples" / "ddp_loop.py"), "--epochs", "2"]
    proc = launch(TORCHRUN, *ranks, str(dumps / "whole"), *example, "--out", str(whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("chosen stage") == 1  # rank 0 speaks
    summary = read_summary(whole)
    assert summary["status"] == "complete" and summary["provenance"]["world_size"] == 2
    assert stage_table(summary) == [
        (0, "baseline", ["hidden1", "hidden2", "output"], 2),
        (1, "cascade", ["hidden1", "hidden2"], 2),
        (2, "cascade", ["hidden1"], 2),
    ]
    # BatchNorm statistics of each rank's last batch differ: every rank goes on from rank 0's
    assert_ranks_hold_the_run(whole, dumps / "whole", [0, 1, 2])

    killed = launch(TORCHRUN, *ranks, str(dumps / "run"), "--kill", "1:1", *example, "--out", str(run))
    assert killed.returncode != 0
    before = read_summary(run)
    # "failed" where rank 0 saw its peer gone before torchrun stopped it
    assert before["status"] in ("running", "failed") and stage_table(before) == stage_table(summary)[:2]
    kept = {i: (run / "checkpoints" / f"stage-{i}.safetensors").read_bytes() for i in (0, 1)}
    resumed = launch(TORCHRUN, *ranks, str(dumps / "run"), *example, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["world_size"] for r in read_summary(run)["resumed_on"]] == [2]
    assert read_summary(run)["stages"][:2] == before["stages"]
    assert all((run / "checkpoints" / f"stage-{i}.safetensors").read_bytes() == kept[i] for i in kept)
    assert without_seconds(read_summary(run)) == without_seconds(summary)  # the same stages, the same choice
    for name in ("stage-2", "best"):  # the same weights (the files' headers name their run)
        a, b = (load_tensors(r / "checkpoints" / f"{name}.safetensors")[0] for r in (run, whole))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # stage 1 is left out: torchrun may stop rank 0 before it saved its copy
    assert_ranks_hold_the_run(run, dumps / "run", [0, 2])


def test_compare_and_analyse_with_jobs_equal_one_process(tmp_path):
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k != "seconds"}
        return [strip(v) for v in o] if isinstance(o, list) else o

    for command, extra, record in (
        ("compare", ["--seeds", "2"], "compare.json"),
        ("analyse", ["--subsets", "0.5"], "analyse.json"),
    ):
        args = [command, "digits", "--preset", "tiny", *extra]
        cli(*args, "--out", str(tmp_path / f"{command}-1"), check=True)
        two_jobs = cli(*args, "--out", str(tmp_path / f"{command}-2"), "--jobs", "2", check=True)
        one, two = (json.loads((tmp_path / f"{command}-{j}" / record).read_text()) for j in (1, 2))
        assert strip(one) == strip(two)
        # the two workers' progress lines stay whole, and each names its run
        runs = {p.name for p in (tmp_path / f"{command}-2" / "runs").iterdir()}
        lines = [line for line in two_jobs.stderr.splitlines() if line.strip()]
        assert lines and all(
            line.split(": ", 1)[0] in runs and line.count(" epoch ") <= 1 for line in lines
        ), two_jobs.stderr
        finished = sorted(line.split(":")[0] for line in lines if ": finished: stage " in line)
        assert finished == sorted(runs)


def _killed(task, _):
    """A worker that the kernel kills (as the out-of-memory killer would)."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_from_outside_is_a_one_line_error_not_a_crash():
    with pytest.raises(TrainingError, match="worker process ended abruptly .* run the same command again"):
        in_parallel(_killed, [(0,), (1,)], toy_task(), Local(2), toy_task)


def _task_with_a_warning():
    from topdown.console import warn

    warn("a fact about the data, said while building the task")
    return toy_task()


def _one(task, _):
    return 1


def _warning_one(task, _):
    from topdown.console import warn

    warn("said by a worker while it ran")
    return 1


def test_workers_do_not_repeat_what_building_the_task_said(capfd):
    """The main process builds the task (and says what there is to say) before the workers build theirs."""
    assert in_parallel(_one, [(0,), (1,)], toy_task(), Local(2), _task_with_a_warning) == [1, 1]
    assert "a fact about the data" not in capfd.readouterr().err
    # what a worker says while it runs does reach stderr: the silence above is not a lost stream
    assert in_parallel(_warning_one, [(0,), (1,)], toy_task(), Local(2), _task_with_a_warning) == [1, 1]
    assert capfd.readouterr().err.count("said by a worker while it ran") == 2


def test_ctrl_c_in_one_process_stops_the_runs_still_to_come():
    """With --jobs 1 the runs are called one after another in this process: Ctrl-C in the first
    must not be stored like a run's error while the others go on training."""
    called = []

    def interrupted(task, i):
        called.append(i)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        in_parallel(interrupted, [(0,), (1,), (2,)], toy_task(), Local(1), None)
    assert called == [0]


def test_more_jobs_than_cpus_is_warned_about(capfd, monkeypatch):
    """Workers beyond the cores take turns on them and lose throughput in all: worth a line."""
    import topdown.jobs

    monkeypatch.setattr(topdown.jobs, "usable_cpus", lambda: 2)
    in_parallel(_one, [(0,), (1,)], toy_task(), Local(2), toy_task)
    assert "take turns" not in capfd.readouterr().err
    monkeypatch.setattr(topdown.jobs, "usable_cpus", lambda: 1)
    in_parallel(_one, [(0,), (1,)], toy_task(), Local(2), toy_task)
    assert "--jobs 2 is more than the 1 usable CPUs: the workers take turns" in capfd.readouterr().err


def _ctrl_c_as_in_a_terminal() -> None:
    """A command started in the background of a script inherits SIGINT ignored (so did this test
    under such a CI run); the command under test must get it as a terminal's Ctrl-C would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_parallel_comparison_at_once_and_says_how_to_continue(tmp_path):
    """Ctrl-C reaches the whole process group; the runs in progress stop at once (each resumes
    from its last saved epoch) instead of the command waiting for them to finish."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "topdown.cli",
            "compare",
            "digits",
            "--preset",
            "tiny",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--set",
            "train.epochs=100000",
            "--set",
            "train.early_stop=0",
            "--out",
            str(tmp_path / "cmp"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    for line in proc.stderr:  # wait until both workers train
        if "epoch 2/" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rest = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the comparison went on after Ctrl-C")
    assert (
        proc.returncode == 130
        and "interrupted; finished epochs are saved, run the same command again" in rest
    )
