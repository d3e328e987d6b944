"""`sweep`: a fair comparison per cell of a grid of config values, resumed, gathered, refused when bad."""

import json
import shutil

import pytest
from conftest import read_summary, toy_task
from safetensors.torch import load_file

import topdown.procedures as procedures
from topdown.arms import CONTROLS
from topdown.cli import main
from topdown.compare import run_compare
from topdown.config import RunConfig
from topdown.errors import ConfigError, DataError
from topdown.report import format_metric
from topdown.sections import CommandLineValue
from topdown.sweep import parse_axis, run_sweep, sweep_cells
from topdown.tasks import resolve_config

# a cascade of two stages, so best-of-k has k = 2: three runs per seed and cell
CONFIG = RunConfig.from_dict({"train": {"epochs": 1, "lr": 0.01}, "cascade": {"splits": [2]}})
AXES = {"train.lr": [0.01, 0.03], "train.epochs": [1, 2]}
CELLS = [f"train.lr={lr},train.epochs={e}" for lr in ("0.01", "0.03") for e in (1, 2)]


def counted_runs(monkeypatch) -> list[str]:
    """The runs trained from now on (run directory names under their cell), in order."""
    calls, real = [], procedures.run_procedure
    monkeypatch.setattr(
        procedures,
        "run_procedure",
        lambda proc, task, out, **kw: (
            calls.append(f"{out.parents[1].name}/{out.name}") or real(proc, task, out, **kw)
        ),
    )
    return calls


def test_a_sweep_runs_one_comparison_per_cell_gathers_them_and_resumes(tmp_path, monkeypatch):
    calls = counted_runs(monkeypatch)
    record = run_sweep(toy_task(), tmp_path, seeds=2, axes=AXES, config=CONFIG)
    runs = ("cascade-seed{}", "equal-epochs-seed{}", "baseline-seed{}-extra1")
    assert sorted(calls) == sorted(f"{c}/{r.format(s)}" for c in CELLS for r in runs for s in (0, 1))
    # the runs of every cell share the workers: every cell's first arm runs before any cell's baselines
    assert calls[:8] == [f"{c}/cascade-seed{s}" for c in CELLS for s in (0, 1)]
    assert [c["name"] for c in record["cells"]] == CELLS
    assert record["axes"] == {"train.lr": [0.01, 0.03], "train.epochs": [1, 2]}
    assert record["arms"] == record["budget_arms"] == ["cascade"]  # what a rebuild needs to compare
    for cell in record["cells"]:
        summary = read_summary(tmp_path / "cells" / cell["name"] / "runs" / "cascade-seed1")
        assert summary["config"]["train"]["lr"] == cell["values"]["train.lr"]
        assert summary["config"]["train"]["epochs"] == cell["values"]["train.epochs"]
        assert summary["config"]["cascade"]["splits"] == [2]  # the base configuration under the axes
        compared = json.loads((tmp_path / "cells" / cell["name"] / "compare.json").read_text())
        assert compared["config"]["train"]["lr"] == cell["values"]["train.lr"]
        assert set(cell["arms"]) == set(compared["arms"]) == {"baseline", "cascade", *CONTROLS}
        for arm, entry in cell["arms"].items():  # compare's own numbers, not computed again
            assert entry == {k: compared["arms"][arm][k] for k in ("test", "vs_baseline")}
        winners = [a for a, v in compared["arms"].items() if v.get("beats_every_control")]
        assert cell["beats_every_control"] == winners
    assert json.loads((tmp_path / "sweep.json").read_text()) == record
    assert record["cells"][0]["arms"]["cascade"]["vs_baseline"]["ci95"] is not None  # 2 seeds: an interval
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("](cells/") == 4 and "| 0.03 | 2 |" in md and "cascade − baseline" in md
    assert "| detectable | beats every control |" in md
    for cell in record["cells"]:
        row = next(line for line in md.splitlines() if f"](cells/{cell['name']}/" in line)
        varying = [
            v["vs_baseline"] for a, v in cell["arms"].items() if a != "baseline" and v["vs_baseline"]["std"]
        ]
        resolution = [v["detectable"] for v in varying]
        low, high = (
            format_metric(x, record["metric"], sign=False) for x in (min(resolution), max(resolution))
        )
        shown = low if low == high else f"{low}–{high}"
        assert f"| {shown} | {', '.join(cell['beats_every_control']) or 'none'} |" in row
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((tmp_path / "cells" / c / "compare.png").is_file() for c in CELLS)

    calls.clear()
    # again, with the axes' values changed: the cells it had are read back, not trained, and kept
    fewer = run_sweep(
        toy_task(), tmp_path, seeds=2, axes={"train.lr": [0.03], "train.epochs": [2, 1]}, config=CONFIG
    )
    assert calls == [] and fewer["cells"] == [record["cells"][3], record["cells"][2]]
    assert all((tmp_path / "cells" / c).is_dir() for c in CELLS)
    # a cell is an ordinary comparison: `compare` with its values continues it, training nothing
    cell = CONFIG.updated({"train": {"lr": 0.03, "epochs": 2}})
    assert (
        run_compare(toy_task(), tmp_path / "cells" / CELLS[3], seeds=2, config=cell)["arms"]
        == json.loads((tmp_path / "cells" / CELLS[3] / "compare.json").read_text())["arms"]
    )
    assert calls == []
    # with an effect (points of the error rate): the seeds each cell's differences would need for it
    record = run_sweep(toy_task(), tmp_path, seeds=2, axes=AXES, config=CONFIG, effect=5.0)
    assert calls == [] and record["effect"] == pytest.approx(0.05)
    md = (tmp_path / "sweep.md").read_text()
    assert "| detectable | seeds for 5.00 | beats every control |" in md
    for cell in record["cells"]:
        compared = json.loads((tmp_path / "cells" / cell["name"] / "compare.json").read_text())
        differences = [v["vs_baseline"] for a, v in compared["arms"].items() if a != "baseline"]
        assert [v["vs_baseline"] for a, v in cell["arms"].items() if a != "baseline"] == differences
        needed = [v["seeds_needed"] for v in differences if v["std"]]
        row = next(line for line in md.splitlines() if f"](cells/{cell['name']}/" in line)
        shown = str(min(needed)) if min(needed) == max(needed) else f"{min(needed)}–{max(needed)}"
        assert f" | {shown} | " in row


def test_a_cell_s_results_are_written_as_soon_as_its_runs_finish(tmp_path, monkeypatch):
    """A run that fails in one cell stops the sweep, but a cell whose runs had all finished has its
    compare.* already: a long sweep shows its finished cells while the others run."""
    real = procedures.run_procedure

    def failing(proc, task, out, **kw):
        if out.parents[1].name == "train.lr=0.03" and out.name == "equal-epochs-seed0":
            raise RuntimeError("a lost worker")
        return real(proc, task, out, **kw)

    monkeypatch.setattr(procedures, "run_procedure", failing)
    with pytest.raises(RuntimeError, match="a lost worker"):
        run_sweep(toy_task(), tmp_path, seeds=1, axes={"train.lr": [0.01, 0.03]}, config=CONFIG)
    assert (tmp_path / "cells" / "train.lr=0.01" / "compare.json").is_file()
    assert not (tmp_path / "cells" / "train.lr=0.03" / "compare.json").exists()
    assert not (tmp_path / "sweep.json").exists()


def test_axis_values_are_read_as_set_reads_them():
    assert parse_axis("cascade.splits=[3,1],[2, 1]") == (
        "cascade.splits",
        [CommandLineValue("[3,1]"), CommandLineValue("[2, 1]")],
    )
    axes = dict([parse_axis("train.lr=1e-3,0.01"), parse_axis("train.optimizer=sgd,adam")])
    cells = sweep_cells(CONFIG, axes)
    assert [c.name for c in cells] == [
        "train.lr=0.001,train.optimizer=sgd",
        "train.lr=0.001,train.optimizer=adam",
        "train.lr=0.01,train.optimizer=sgd",
        "train.lr=0.01,train.optimizer=adam",
    ]
    assert cells[1].config.train.lr == 0.001 and cells[1].config.train.optimizer == "adam"
    assert cells[1].config.train.epochs == 1  # the rest is the base configuration
    splits = sweep_cells(CONFIG, dict([parse_axis("cascade.splits=[2,1],[1]")]))
    assert [c.name for c in splits] == ["cascade.splits=2-1", "cascade.splits=1"]
    assert splits[0].config.cascade.splits == [2, 1]
    with pytest.raises(ConfigError, match="gives 0.01 twice"):
        sweep_cells(CONFIG, {"train.lr": [0.01, 1e-2]})
    with pytest.raises(ConfigError, match="no values"):
        sweep_cells(CONFIG, {"train.lr": []})


@pytest.mark.parametrize(
    "axes, message",
    [
        (["train.lrr=0.1,0.2"], "--axis train.lrr=0.1: unknown config key 'train.lrr'"),
        (["train.lr=0.1,-1"], "--axis train.lr=-1: train.lr is -1"),
        (["train.epochs=2,x"], "--axis train.epochs=x: config key 'train.epochs' expects a int"),
        (["train.lr="], "--axis train.lr=: an empty value"),
        (["train.lr=0.1,,0.2"], "an empty value"),
        (["train.lr=0.1", "train.lr=0.2"], "--axis train.lr is given twice"),
        (["train.lr"], "--axis expects KEY=VALUE"),
    ],
)
def test_a_bad_axis_is_one_line_and_writes_nothing(tmp_path, capsys, axes, message):
    out = tmp_path / "sweep"
    argv = ["sweep", "digits", "--preset", "tiny", "--seeds", "2", "--out", str(out)]
    assert main([*argv, *[f"--axis={a}" for a in axes]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_the_command_sweeps_a_task_key_in_worker_processes(tmp_path, capsys):
    """model.hidden changes the task itself: each cell's runs train its own model, in two workers."""
    out = tmp_path / "sweep"
    base = ["--preset", "tiny", "--seeds", "1", "--set", "train.epochs=1", "--set", "cascade.splits=[2]"]
    args = ["sweep", "digits", *base, "--axis", "model.hidden=8,16", "--out", str(out)]
    assert main([*args, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| 8 | " in printed and "| 16 | " in printed  # sweep.md
    for hidden in (8, 16):
        runs = out / "cells" / f"model.hidden={hidden}" / "runs"
        for run in ("cascade-seed0", "equal-epochs-seed0", "baseline-seed0-extra1"):
            weights = load_file(runs / run / "checkpoints" / "best.safetensors")
            assert weights["hidden.0.0.weight"].shape == (hidden, 64)
    record = json.loads((out / "sweep.json").read_text())
    assert [c["values"] for c in record["cells"]] == [{"model.hidden": 8}, {"model.hidden": 16}]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert len(mtimes) == 6
    assert main(args) == 0  # again, in one process: every run read back, none trained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == mtimes
    assert json.loads((out / "sweep.json").read_text()) == record
    capsys.readouterr()
    shutil.rmtree(out / "cells" / "model.hidden=16" / "runs" / "cascade-seed0")  # as if not yet run
    (out / "cells" / "model.hidden=16" / "compare.md").unlink()
    assert main(["report", str(out)]) == 0  # where each cell stands
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| model.hidden=16 | 2 | 0 | 0 | not yet |",
        "| model.hidden=8 | 3 | 0 | 0 | yes |",
    ]


def test_a_task_axis_needs_a_task_factory(tmp_path):
    digits = resolve_config("digits", "tiny", {})
    with pytest.raises(ConfigError, match="--axis model.hidden changes the task"):
        run_sweep(toy_task(), tmp_path, seeds=1, axes={"model.hidden": [8]}, config=digits)
    assert not any(tmp_path.iterdir())


def test_a_committed_sweep_rebuilds_from_its_archive_without_training(tmp_path, capsys, monkeypatch):
    """A sweep kept as its sweep.* and one runs.tar.xz (every cell's runs) is made again, to the same
    numbers, by `sweep --runs-from` and bench/check_archives.py, training nothing."""
    import sys

    from conftest import ROOT

    from topdown.archive import pack_sweep, restore_sweep, write_archive

    sys.path.insert(0, str(ROOT / "bench"))
    import check_archives

    made = tmp_path / "made"
    args = ["sweep", "digits", "--preset", "tiny", "--seeds", "2", "--set", "train.epochs=1"]
    args += ["--set", "cascade.splits=[2]", "--axis", "model.hidden=8,16"]
    assert main([*args, "--out", str(made)]) == 0
    record = json.loads((made / "sweep.json").read_text())
    results = tmp_path / "results"  # as bench/results/NAME holds it: no checkpoints, no loose runs
    packed = pack_sweep(made, results / "runs.tar.xz")
    assert len(packed) == 2 * 2 * 3 and "model.hidden=8/cascade-seed0" in packed
    shutil.copy(made / "sweep.json", results / "sweep.json")
    for cell in record["cells"]:
        (results / cell["dir"]).mkdir(parents=True)
        shutil.copy(made / cell["dir"] / "compare.json", results / cell["dir"] / "compare.json")
    capsys.readouterr()

    monkeypatch.setattr(procedures, "run_procedure", lambda *a, **kw: pytest.fail("trained a run"))
    again = tmp_path / "again"
    assert main([*args, "--out", str(again), "--runs-from", str(results / "runs.tar.xz")]) == 0
    assert "restored 12 finished runs" in capsys.readouterr().out
    assert json.loads((again / "sweep.json").read_text()) == record
    assert restore_sweep(results / "runs.tar.xz", again) == []  # nothing it lacks
    assert check_archives.check(results) == "same numbers"
    (results / "sweep.json").write_text(json.dumps({**record, "seeds": 3}))
    assert check_archives.check(results).startswith("not rebuilt")  # a seed the archive lacks
    write_archive(tmp_path / "compare.tar.xz", {"runs/cascade-seed0/summary.json": b"{}"})
    with pytest.raises(DataError, match="is not cells/CELL/runs/RUN/FILE"):
        restore_sweep(tmp_path / "compare.tar.xz", again)  # a comparison's archive, not a sweep's
    with pytest.raises(DataError, match="not a sweep's directory"):
        pack_sweep(again / "cells", tmp_path / "x.tar.xz")


def test_the_regime_map_has_a_panel_per_combination_of_the_other_axes(monkeypatch):
    """Three axes: the first along x, a row per value of the second, a column per value of the third."""
    import topdown.sweep as sweep

    def cell(a, b, c):
        diff = {"mean": 0.01 * a, "ci95": [0.0, 0.02 * a]}
        return {
            "values": {"a": a, "b": b, "c": c},
            "arms": {"baseline": {}, "cascade": {"vs_baseline": diff}},
        }

    axes = {"a": [1, 2, 3], "b": [0, 1], "c": ["x", "y"]}
    cells = [cell(a, b, c) for a in axes["a"] for b in axes["b"] for c in axes["c"]]
    record = {"task": "toy", "preset": None, "seeds": 2, "metric": "error", "axes": axes, "cells": cells}
    figures = []
    monkeypatch.setattr(sweep, "save_figure", lambda fig, path: figures.append(fig))
    sweep.plot(record, None)
    panels = figures[0].axes
    assert [p.get_title() for p in panels] == ["b=0, c=x", "b=0, c=y", "b=1, c=x", "b=1, c=y"]
    for panel in panels:  # each panel: the cascade's three means along a, on one shared scale
        (line,) = panel.get_lines()[:1]
        assert [round(y, 6) for y in line.get_ydata()] == [1.0, 2.0, 3.0]
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[3])


def test_an_arm_that_kept_the_baseline_on_every_seed_says_nothing_of_a_cell_s_resolution():
    """Its difference is zero throughout (detectable 0, 2 seeds needed): sweep.md's range leaves it out."""
    from topdown.sweep import render

    def difference(mean, std, detectable, needed):
        return {"mean": mean, "std": std, "ci95": [mean - std, mean + std], "p_sign_flip": 1.0,
                "detectable": detectable, "seeds_needed": needed}  # fmt: skip

    arms = {
        "baseline": {"test": {"mean": 0.1, "std": 0.01}, "vs_baseline": None},
        "kept": {"test": {"mean": 0.1, "std": 0.01}, "vs_baseline": difference(0.0, 0.0, 0.0, 2)},
        "moved": {"test": {"mean": 0.09, "std": 0.01}, "vs_baseline": difference(-0.01, 0.02, 0.03, 40)},
        "also": {"test": {"mean": 0.09, "std": 0.01}, "vs_baseline": difference(-0.01, 0.01, 0.015, 12)},
    }
    cell = {"name": "x=1", "dir": "cells/x=1", "values": {"x": 1}, "arms": arms, "beats_every_control": []}
    record = {"task": "toy", "preset": None, "seeds": 5, "metric": "error", "lower_is_better": True,
              "axes": {"x": [1]}, "cells": [cell], "effect": 0.005}  # fmt: skip
    row = render(record).splitlines()[-3]
    assert "| 1.50–3.00 | 12–40 | none |" in row
