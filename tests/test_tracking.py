"""Experiment tracking (--track tensorboard, --track mlflow): what the trackers hold, read back with
their own readers, equals the run's records (metrics.jsonl, summary.json), through our loop, a
user's loop, a resume and a comparison; a missing extra is one line before anything starts."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ToyNet, toy_data, toy_task
from torch.nn import functional as F

import topdown
from topdown import distributed
from topdown.cli import main
from topdown.compare import run_compare
from topdown.record import RunRecord

BLOCKS = [("inp", ["inp"]), ("mid", ["mid"]), ("out", ["out"])]


def tensorboard(run: Path) -> dict[str, dict[int, list[float]]]:
    """Every scalar in ``run/tensorboard``, as TensorBoard reads it: tag -> step -> values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            out.setdefault(tag, {}).setdefault(e.step, []).append(e.value)
    return out


def mlflow_client(uri: str):
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MlflowClient(uri)


def mlflow(run: Path, uri: str | None = None) -> tuple[object, dict[str, dict[int, list[float]]]]:
    """The MLflow run that ``run`` logged to (``run/mlflow.json``) and its every metric value."""
    client = mlflow_client(uri or (run / "mlruns").resolve().as_uri())
    logged = client.get_run(json.loads((run / "mlflow.json").read_text())["run_id"])
    history: dict[str, dict[int, list[float]]] = {}
    for key in logged.data.metrics:
        for m in sorted(client.get_metric_history(logged.info.run_id, key), key=lambda m: m.timestamp):
            history.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return logged, history


def expected(run: Path) -> dict[str, dict[int, float]]:
    """What a tracker must hold, from the run's own records: each epoch's train loss, lr and validation
    metrics at its line's position in metrics.jsonl; each stage's decision, validation and test
    metrics at its index; the chosen stage and its test metrics."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    want: dict[str, dict[int, float]] = {}
    for step, line in enumerate(lines, 1):
        for key in ("train_loss", "lr", "epoch", "stage"):
            if line.get(key) is not None:
                want.setdefault(key, {})[step] = line[key]
        for name, value in line["val"].items():
            want.setdefault(f"val/{name}", {})[step] = value
    for st in summary["stages"]:
        want.setdefault("stages/accepted", {})[st["index"]] = float(st["accepted"])
        want.setdefault("stages/epochs", {})[st["index"]] = st["epochs"]
        for split in ("val", "test"):
            for name, value in st[split].items():
                want.setdefault(f"stages/{split}/{name}", {})[st["index"]] = value
    if summary["status"] == "complete":
        want["chosen_stage"] = {0: summary["chosen_stage"]}
        for name, value in summary["test"].items():
            want[f"test/{name}"] = {0: value}
    assert want["val/error"] and want["stages/accepted"]
    return want


def assert_holds(logged: dict[str, dict[int, list[float]]], want: dict[str, dict[int, float]], f32=False):
    """Each expected key at exactly its steps, logged once, with the record's value (TensorBoard keeps
    float32)."""
    for key, steps in want.items():
        assert key in logged, key
        assert sorted(logged[key]) == sorted(steps), key
        for step, value in steps.items():
            value = float(np.float32(value)) if f32 else value
            assert logged[key][step] == [value], (key, step)


def test_a_command_line_run_logs_its_epochs_and_stages_to_both_trackers(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(["cascade", "digits", "--preset", "tiny", "--out", str(run), "--track", "tensorboard,mlflow"])
        == 0
    )
    want = expected(run)
    assert_holds(tensorboard(run), want, f32=True)
    logged, history = mlflow(run)
    assert_holds(history, want)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    summary = json.loads((run / "summary.json").read_text())
    assert logged.data.params["config.train.lr"] == str(summary["config"]["train"]["lr"])
    assert logged.data.params["procedure"] == "cascade" and logged.data.params["task"] == "digits"
    client = mlflow_client((run / "mlruns").resolve().as_uri())
    assert client.get_experiment(logged.info.experiment_id).name == "digits"  # the task's name
    # logging is no part of the run's identity: resuming without it is allowed (the run is complete)
    assert main(["cascade", "digits", "--preset", "tiny", "--out", str(run), "--resume"]) == 0


def crashing_loop(
    out: Path, track, resume: bool = False, crash_at: tuple[int, int] | None = None
) -> topdown.Plan:
    """A user's own loop through a cascade: two epochs a stage, each logged with ``stage.log``; it
    fails at ``crash_at`` (stage, epoch), before that epoch is logged."""
    torch.manual_seed(0)
    x, y = toy_data()
    plan = topdown.Cascade(
        ToyNet(),
        BLOCKS,
        build_model=ToyNet,
        metric="error",
        out=out,
        track=track,
        resume=resume,
        config={"cascade": {"splits": [1]}},
    )

    def error(split):
        xs, ys = (x[128:160], y[128:160]) if split == "val" else (x[160:], y[160:])
        stage.model.eval()
        with torch.no_grad():
            return {"error": (stage.model(xs).argmax(1) != ys).float().mean().item()}

    try:
        for stage in plan:
            opt = torch.optim.Adam(stage.trainable_parameters(), lr=0.01)
            for epoch in (1, 2):
                stage.model.train()
                loss = F.cross_entropy(stage.model(x[:128]), y[:128])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if (stage.index, epoch) == crash_at:
                    raise RuntimeError("the loop crashed")
                stage.log({"epoch": epoch, "val": error("val"), "train_loss": loss})
            stage.finish(val=error("val"), test=error("test"), epochs=2)
    except RuntimeError:
        plan.fail()
    return plan


def test_a_resumed_run_continues_the_same_mlflow_run_and_rewrites_tensorboard(tmp_path):
    run = tmp_path / "loop"
    crashing_loop(run, ["tensorboard", "mlflow"], crash_at=(1, 2))  # stage 1's first epoch logged, not saved
    first, _ = mlflow(run)
    assert first.info.status == "FAILED"
    plan = crashing_loop(run, "tensorboard,mlflow", resume=True)
    assert plan.summary["status"] == "complete"
    want = expected(run)
    assert len(want["val/error"]) == 4  # two stages of two epochs; stage 1's first epoch trained again
    assert_holds(tensorboard(run), want, f32=True)  # exactly the records: the dropped epoch is gone
    logged, history = mlflow(run)
    assert logged.info.run_id == first.info.run_id and logged.info.status == "FINISHED"
    # MLflow forgets nothing: the epoch trained again holds both values, the record's last; every
    # other epoch and stage is logged once
    retrained = history["val/error"].pop(3)
    assert len(retrained) == 2 and retrained[-1] == want["val/error"].pop(3)
    for key in ("train_loss", "epoch", "stage"):
        history[key].pop(3), want[key].pop(3)
    assert_holds(history, want)


def test_logging_added_on_resume_catches_up_on_the_whole_record(tmp_path):
    run = tmp_path / "toy"
    train = topdown.TrainConfig(epochs=2)
    topdown.cascade(toy_task(), run, train=train)
    assert not (run / "tensorboard").exists() and not (run / "mlflow.json").exists()
    topdown.cascade(toy_task(), run, train=train, resume=True, track="mlflow")
    assert_holds(mlflow(run)[1], expected(run))
    topdown.cascade(toy_task(), run, train=train, resume=True, track="mlflow")  # nothing new: nothing logged
    assert_holds(mlflow(run)[1], expected(run))


def test_a_comparison_logs_each_run_under_its_name_in_one_experiment(tmp_path):
    out = tmp_path / "cmp"
    config = topdown.RunConfig.from_dict({"train": {"epochs": 1}, "cascade": {"splits": [1]}})
    run_compare(toy_task(), out, seeds=1, config=config, track=("tensorboard", "mlflow"))
    uri = (out / "mlruns").resolve().as_uri()
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("cmp")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    runs = {p.name for p in (out / "runs").iterdir()}
    assert names == runs and "cascade-seed0" in runs
    for name in runs:
        assert_holds(tensorboard(out / "runs" / name), expected(out / "runs" / name), f32=True)
        assert_holds(mlflow(out / "runs" / name, uri)[1], expected(out / "runs" / name))


@pytest.mark.parametrize(
    "tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")]
)
def test_a_missing_extra_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    run = tmp_path / "run"
    assert main(["cascade", "digits", "--preset", "tiny", "--out", str(run), "--track", tracker]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"topdown: error: --track {tracker} needs the tracking extra (tensorboard, mlflow-skinny): "
        'pip install "topdown[tracking]"'
    ]
    assert not run.exists()
    with pytest.raises(topdown.ConfigError, match=r"topdown\[tracking\]"):
        topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=run, track=[tracker])
    assert not run.exists()


def test_bad_logging_options_are_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["baseline", "digits", "--preset", "tiny", "--out", str(run), "--track", "wandb"]) == 1
    assert "unknown tracker 'wandb' (--track); trackers: tensorboard, mlflow" in capsys.readouterr().err
    assert main(["baseline", "digits", "--preset", "tiny", "--out", str(run), "--mlflow-uri", "x"]) == 1
    assert "is for --track mlflow" in capsys.readouterr().err
    with pytest.raises(topdown.ConfigError, match="give the plan one"):
        topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", track="tensorboard")
    assert not run.exists()


def test_only_the_process_that_writes_the_run_logs(tmp_path, monkeypatch):
    tracking = topdown.Tracking(("tensorboard", "mlflow"))
    assert len(RunRecord(tmp_path / "a", tracking).tracked.active) == 2
    monkeypatch.setattr(distributed, "is_writer", lambda: False)  # rank 1 of a data-parallel run
    assert RunRecord(tmp_path / "b", tracking).tracked.active == []


def test_a_tracker_that_cannot_start_stops_the_run_before_it_trains(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["baseline", "digits", "--preset", "tiny", "--out", str(run)]
    assert main([*args, "--track", "mlflow", "--mlflow-uri", "nosuchscheme://x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("topdown: error: --track mlflow: ") and "Traceback" not in "\n".join(err)
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    assert not (run / "metrics.jsonl").exists()
    assert main(args) == 0  # a run that saved nothing starts afresh, no --resume needed


def test_the_options_pass_through_torchrun_to_every_process():
    """``--nproc`` hands the command line to torchrun, whose parser would refuse an option that is a
    prefix of its own (``--log`` of ``--log-dir``) even after the module's name."""
    from torch.distributed.run import get_args_parser

    ours = ["cascade", "digits", "--track", "tensorboard,mlflow", "--mlflow-uri", "http://host:5000"]
    parsed = get_args_parser().parse_args(["--standalone", "--nproc_per_node=2", "-m", "topdown.cli", *ours])
    assert parsed.training_script_args == ours
