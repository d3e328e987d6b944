"""`compare`: arm budgets, selection on validation only, reuse of runs, statistics, resuming."""

import json
import math

import pytest
from conftest import cli, toy_task, without_seconds

import topdown.compare as compare
import topdown.procedures as procedures
from topdown.archive import pack_runs, read_archive, restore_runs, run_record, write_archive
from topdown.arms import (
    CONTROLS,
    cascade_run,
    equal_epochs_config,
    equal_run,
    extra_run,
    extra_seed,
    run_only,
)
from topdown.compare import run_compare
from topdown.config import RunConfig
from topdown.errors import ConfigError, DataError
from topdown.metrics import Metric
from topdown.stats import paired_stats, sign_flip_p, t975

CONFIG = RunConfig.from_dict({"train": {"epochs": 2, "lr": 0.01}})
ARMS = ("baseline", "cascade", "baseline-equal-epochs", "best-of-k")  # a comparison's, by default


def test_statistics_match_a_hand_computation():
    values, reference = [0.10, 0.12, 0.08, 0.11], [0.12, 0.13, 0.11, 0.10]
    s = paired_stats(values, reference)
    diffs = [-0.02, -0.01, -0.03, 0.01]
    mean = sum(diffs) / 4  # -0.0125
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)  # 0.017078
    half = 3.182 * sd / 2
    assert s["mean"] == pytest.approx(-0.0125) and s["std"] == pytest.approx(sd)
    assert s["ci95"] == pytest.approx([mean - half, mean + half])
    assert (s["lower"], s["higher"]) == (3, 1)
    # sign flips of magnitudes (.02, .01, .03, .01): |sum| >= .05 for all-same-sign (.07, 2
    # patterns) and for exactly one .01 flipped (.05, 2 x 2 patterns): p = 6/16
    assert s["p_sign_flip"] == pytest.approx(6 / 16)
    assert sign_flip_p([0.1] * 5) == pytest.approx(2 / 32)
    assert t975(1) == 12.706 and t975(120) == pytest.approx(1.980, abs=2e-3)
    one = paired_stats([0.10], [0.12])  # one seed: a difference, no spread (null in compare.json, not NaN)
    assert one["mean"] == pytest.approx(-0.02) and one["std"] is None and one["ci95"] is None


def test_a_one_seed_comparison_writes_strict_json_and_no_spread(tmp_path):
    run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG)
    json.loads(
        (tmp_path / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in compare.json")
    )
    assert "nan" not in (tmp_path / "compare.md").read_text()


def test_arms_budgets_reuse_and_selection(tmp_path, monkeypatch):
    calls = []
    real = procedures.run_procedure
    monkeypatch.setattr(
        procedures,
        "run_procedure",
        lambda proc, task, out, **kw: calls.append((proc, out.name)) or real(proc, task, out, **kw),
    )
    record = run_compare(toy_task(), tmp_path, seeds=2, config=CONFIG)
    # per seed: one cascade (3 stages, 6 epochs), one equal-epochs baseline, k-1 = 2 extra baselines
    assert sorted(calls) == sorted(
        [("cascade", f"cascade-seed{s}") for s in (0, 1)]
        + [("baseline", f"equal-epochs-seed{s}") for s in (0, 1)]
        + [("baseline", f"baseline-seed{s}-extra{j}") for s in (0, 1) for j in (1, 2)]
    )
    # every cascade is queued first, then the extra baselines its plan implies (known before it runs)
    assert calls[:2] == [("cascade", "cascade-seed0"), ("cascade", "cascade-seed1")]
    assert [c[1] for c in calls[2:6]] == [
        "baseline-seed0-extra1",
        "baseline-seed0-extra2",
        "baseline-seed1-extra1",
        "baseline-seed1-extra2",
    ]
    assert procedures.planned_models(toy_task(), CONFIG) == 3
    assert (
        procedures.planned_models(toy_task(), CONFIG.updated({"cascade": {"patience": 1}})) is None
    )  # may stop early
    for s in (0, 1):
        cascade = json.loads((tmp_path / "runs" / f"cascade-seed{s}" / "summary.json").read_text())
        equal = json.loads((tmp_path / "runs" / f"equal-epochs-seed{s}" / "summary.json").read_text())
        budget = sum(st["epochs"] for st in cascade["stages"])
        assert budget == 6 and equal["config"]["train"]["epochs"] == 6 and equal["stages"][0]["epochs"] <= 6
        arms = {arm: record["arms"][arm]["per_seed"][s] for arm in ARMS}
        assert arms["baseline"]["test"] == cascade["stages"][0]["test"]["error"]  # reused, not retrained
        assert arms["cascade"]["test"] == cascade["test"]["error"] and arms["cascade"]["epochs"] == 6
        assert arms["baseline-equal-epochs"]["epochs"] == equal["stages"][0]["epochs"]
        best = arms["best-of-k"]
        assert best["k"] == 3 and len(best["runs"]) == 3 and best["epochs"] == 6
        vals = {}
        for run in best["runs"]:
            name, _, _ = run.partition("#")
            vals[run] = json.loads((tmp_path / "runs" / name / "summary.json").read_text())["stages"][0][
                "val"
            ]["error"]
        assert vals[best["chosen_run"]] == min(vals.values())
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.png").is_file()
    saved = json.loads((tmp_path / "compare.json").read_text())["arms"]
    assert saved["cascade"]["vs_baseline"]["n"] == 2 and saved["cascade"]["cascade_minus_arm"] is None
    for arm in ("baseline", "baseline-equal-epochs", "best-of-k"):  # cascade minus control, seed by seed
        diffs = [saved["cascade"]["per_seed"][s]["test"] - saved[arm]["per_seed"][s]["test"] for s in (0, 1)]
        assert saved[arm]["cascade_minus_arm"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert (
        "| baseline-equal-epochs | "
        in (tmp_path / "compare.md").read_text().split("Cascade against each control")[1]
    )


def test_the_equal_epochs_arm_trains_the_whole_budget_even_where_the_recipe_stops_early(tmp_path):
    """Validation never improves after epoch 1, so with early stopping every run stops at epoch 2;
    the equal-epochs arm, given the cascade's 6 epochs, must train all 6 rather than repeat the baseline."""
    config = RunConfig.from_dict({"train": {"epochs": 4, "lr": 0.01, "early_stop": 1, "min_lr": 1e-3}})
    run_compare(toy_task(metric_script=[0.5]), tmp_path, seeds=1, config=config)
    cascade = json.loads((tmp_path / "runs" / "cascade-seed0" / "summary.json").read_text())
    equal = json.loads((tmp_path / "runs" / "equal-epochs-seed0" / "summary.json").read_text())
    assert [st["epochs"] for st in cascade["stages"]] == [2, 2, 2]
    assert equal["stages"][0]["epochs"] == 6 and equal["config"]["train"]["early_stop"] == 0
    assert (
        equal["config"]["train"]["min_lr"] == 0.0
    )  # under the plateau schedule the lr floor also ends a run
    onecycle = equal_epochs_config(config.updated({"train": {"schedule": "onecycle"}}), 9)
    assert (onecycle.train.epochs, onecycle.train.early_stop, onecycle.train.min_lr) == (
        9,
        0,
        1e-3,
    )  # min_lr: no effect there


def test_finished_runs_made_on_other_data_are_not_reused(tmp_path):
    """The task's recorded description of its data is part of what a reused run must match; a
    statistic that differs only in its last bits (another CPU) still matches."""
    first = toy_task()
    first.info = {"data": "corpus A", "mean": [0.1234567]}
    run_compare(first, tmp_path, seeds=1, config=CONFIG)
    again = toy_task()
    again.info = {"data": "corpus A", "mean": [0.1234567 * (1 + 1e-7)]}
    run_compare(again, tmp_path, seeds=1, config=CONFIG)  # read back: nothing differs that matters
    moved = toy_task()
    moved.info = {
        "data": "corpus A",
        "mean": [0.1234567],
        "data_dir": "/elsewhere",
    }  # where the data lies is not what it is
    run_compare(moved, tmp_path, seeds=1, config=CONFIG)
    other = toy_task()
    other.info = {"data": "corpus B", "mean": [0.1234567]}
    with pytest.raises(procedures.TopdownError, match=r"cannot reuse .*'task_info' \(data\)"):
        run_compare(other, tmp_path, seeds=1, config=CONFIG)


def test_the_forgetting_arm_has_the_cascades_budget_and_baseline(tmp_path):
    plain = run_compare(toy_task(), tmp_path / "plain", seeds=1, config=CONFIG)
    assert (
        "forgetting" not in plain["arms"] and not (tmp_path / "plain" / "runs" / "forgetting-seed0").exists()
    )
    record = run_compare(
        toy_task(), tmp_path / "with", seeds=2, config=CONFIG, arms=["cascade", "forgetting"]
    )
    forget = json.loads((tmp_path / "with" / "runs" / "forgetting-seed1" / "summary.json").read_text())
    cascade = json.loads((tmp_path / "with" / "runs" / "cascade-seed1" / "summary.json").read_text())
    assert forget["procedure"] == "forgetting" and forget["stages"][0]["val"] == cascade["stages"][0]["val"]
    arm = record["arms"]["forgetting"]
    assert (
        arm["per_seed"][1]["test"] == forget["test"]["error"]
        and arm["per_seed"][1]["epochs"] == 6 == record["arms"]["cascade"]["per_seed"][1]["epochs"]
    )
    assert arm["cascade_minus_arm"]["n"] == 2
    assert (
        "| forgetting | "
        in (tmp_path / "with" / "compare.md").read_text().split("Cascade against each control")[1]
    )
    # the other arms are those of the comparison without it
    assert record["arms"]["cascade"]["per_seed"][0]["test"] == plain["arms"]["cascade"]["per_seed"][0]["test"]


def test_the_equal_epochs_baseline_gets_the_largest_budget_among_the_arms(tmp_path):
    """Forgetting for 3 rounds (4 stages) against a cascade of one split (2 stages), on tiny digits from
    the command line: the equal-epochs baseline is given the forgetting run's epochs, the larger."""
    out = tmp_path / "cmp"
    cli(
        "compare",
        "digits",
        "--preset",
        "tiny",
        "--seeds",
        "2",
        "--arms",
        "cascade,forgetting",
        "--set",
        "cascade.splits=[2]",
        "--set",
        "procedure.rounds=3",
        "--out",
        str(out),
        check=True,
    )
    record = json.loads((out / "compare.json").read_text())
    assert list(record["arms"]) == [*ARMS, "forgetting"] and record["budget_arms"] == [
        "cascade",
        "forgetting",
    ]
    for s in (0, 1):
        epochs = {arm: record["arms"][arm]["per_seed"][s]["epochs"] for arm in ("cascade", "forgetting")}
        equal = json.loads((out / "runs" / equal_run(s) / "summary.json").read_text())
        assert (
            epochs["forgetting"] > epochs["cascade"]
            and equal["config"]["train"]["epochs"] == epochs["forgetting"]
        )
        assert (
            record["arms"]["best-of-k"]["per_seed"][s]["k"] == 2
        )  # the cascade's models, as without forgetting
    assert "the most epochs of cascade, forgetting" in " ".join((out / "compare.md").read_text().split())


def test_arms_without_the_cascade_have_a_baseline_run_and_k_from_the_arm_that_trained_most(tmp_path):
    record = run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG, arms=["forgetting"])
    assert list(record["arms"]) == ["baseline", "baseline-equal-epochs", "best-of-k", "forgetting"]
    assert not (tmp_path / "runs" / "cascade-seed0").exists()
    base = json.loads((tmp_path / "runs" / "baseline-seed0" / "summary.json").read_text())
    forget = json.loads((tmp_path / "runs" / "forgetting-seed0" / "summary.json").read_text())
    assert record["arms"]["baseline"]["per_seed"][0]["runs"] == ["baseline-seed0"]
    assert forget["stages"][0]["val"] == base["stages"][0]["val"]  # the same baseline, trained in each
    assert record["arms"]["best-of-k"]["per_seed"][0]["k"] == len(forget["stages"]) == 3
    assert record["arms"]["baseline-equal-epochs"]["per_seed"][0]["runs"] == [equal_run(0)]
    equal = json.loads((tmp_path / "runs" / equal_run(0) / "summary.json").read_text())
    assert equal["config"]["train"]["epochs"] == sum(st["epochs"] for st in forget["stages"])
    assert all(a["cascade_minus_arm"] is None for a in record["arms"].values())
    assert "Cascade against" not in (tmp_path / "compare.md").read_text()


def test_each_arm_is_measured_against_every_control_a_control_plan_included(tmp_path):
    """Which arm beats every control is the regime question: each arm (not a control, not the
    restarts plan, which is one) gets arm minus each control, and the verdict follows the intervals."""
    record = run_compare(toy_task(), tmp_path, seeds=2, config=CONFIG, arms=["cascade", "restarts"])
    arms = record["arms"]
    assert all("vs_controls" not in arms[c] for c in (*CONTROLS, "restarts"))
    vs = arms["cascade"]["vs_controls"]
    assert list(vs) == [*CONTROLS, "restarts"]
    for control, v in vs.items():
        diffs = [
            arms["cascade"]["per_seed"][s]["test"] - arms[control]["per_seed"][s]["test"] for s in (0, 1)
        ]
        assert v["mean"] == pytest.approx(sum(diffs) / 2) and v["n"] == 2
    assert arms["cascade"]["beats_every_control"] == all(v["ci95"][1] < 0 for v in vs.values())
    table = (tmp_path / "compare.md").read_text().split("Each arm against every control")[1]
    assert "| arm − restarts | beats every control |" in table
    assert f"| {'yes' if arms['cascade']['beats_every_control'] else 'no'} |" in table.split("| cascade |")[1]


@pytest.mark.parametrize(
    ("ci", "lower_is_better", "beats"),
    [
        ([-0.3, -0.1], True, True),
        ([-0.3, 0.1], True, False),
        ([0.1, 0.3], True, False),
        ([0.1, 0.3], False, True),
        ([-0.1, 0.3], False, False),
        (None, True, False),  # one seed: no interval, nothing shown
    ],
)
def test_an_arm_beats_a_control_only_where_its_whole_interval_is_on_the_better_side(
    ci, lower_is_better, beats
):
    metric = Metric.named("error" if lower_is_better else "accuracy", lower_is_better)
    assert compare._better({"ci95": ci}, metric) is beats


def test_a_plan_of_ones_own_is_an_arm(tmp_path, monkeypatch):
    (tmp_path / "myplans.py").write_text(
        "import topdown\n\n\nclass Twice(topdown.Plan):\n    procedure = 'twice'\n\n"
        "    def stages(self):\n        yield self.stage_zero()\n"
        "        yield topdown.StageSpec('again', self.all_blocks(), start=0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    record = run_compare(
        toy_task(), tmp_path / "cmp", seeds=1, config=CONFIG, arms=["cascade", "myplans:Twice"]
    )
    run = json.loads((tmp_path / "cmp" / "runs" / "myplans:Twice-seed0" / "summary.json").read_text())
    assert run["procedure"] == "twice" and record["arms"]["myplans:Twice"]["per_seed"][0]["epochs"] == 4
    assert record["arms"]["myplans:Twice"]["cascade_minus_arm"]["n"] == 1
    # read back, not trained again: the run's recorded procedure is the class's
    monkeypatch.setattr(procedures, "run_procedure", lambda *a, **kw: pytest.fail("trained a run"))
    assert run_compare(
        toy_task(), tmp_path / "cmp", seeds=1, config=CONFIG, arms=["cascade", "myplans:Twice"]
    )
    for arms, pattern in [
        (["cascade", "cascade"], "--arms names cascade twice"),
        (["baseline"], "the baseline is a control of every comparison"),
        (["nomodule:Plan"], "cannot import nomodule"),
        ([], "a comparison needs an arm"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            run_compare(toy_task(), tmp_path / "bad", seeds=1, config=CONFIG, arms=arms)
    assert not (tmp_path / "bad").exists()


def test_runs_recorded_under_the_former_name_forget_are_reused_and_resumed(tmp_path, monkeypatch):
    """A comparison made when later-layer forgetting was called ``forget`` (its runs ``forget-seedN``,
    recorded with procedure ``forget``) is read back as it is, its forgetting arm trained again nowhere."""
    made = run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG, arms=["cascade", "forgetting"])
    runs = tmp_path / "runs"
    (runs / "forgetting-seed0").rename(runs / "forget-seed0")
    summary = json.loads((runs / "forget-seed0" / "summary.json").read_text())
    (runs / "forget-seed0" / "summary.json").write_text(json.dumps({**summary, "procedure": "forget"}))
    monkeypatch.setattr(procedures, "run_procedure", lambda *a, **kw: pytest.fail("trained a run"))
    again = run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG, arms=["cascade", "forgetting"])
    assert again["arms"]["forgetting"]["per_seed"][0]["runs"] == ["forget-seed0"]
    assert without_seconds(again["arms"]["forgetting"]["test"]) == without_seconds(
        made["arms"]["forgetting"]["test"]
    )
    assert "| 0 |" in compare.finished_seeds(runs) and "forgetting" in compare.finished_seeds(runs)
    monkeypatch.undo()
    # resumed too: the plan under its name now continues the run recorded under the former one
    resumed = procedures.run_procedure(
        "forgetting", toy_task(), runs / "forget-seed0", config=CONFIG, resume=True
    )
    assert resumed["procedure"] == "forget" and resumed["status"] == "complete"


def test_best_of_k_never_looks_at_test(tmp_path, monkeypatch):
    """Make test error the opposite of validation error: best-of-k must still follow validation."""
    task = toy_task()
    evaluate = task.evaluate

    def inverted(model, split):
        metrics = evaluate(model, "val")
        return metrics if split == "val" else {**metrics, "error": 1 - metrics["error"]}

    task.evaluate = inverted
    record = run_compare(task, tmp_path, seeds=1, config=CONFIG.updated({"cascade": {"splits": [2]}}))
    best = record["arms"]["best-of-k"]["per_seed"][0]
    assert best["test"] == pytest.approx(1 - best["val"])
    pool_val = [
        json.loads((tmp_path / "runs" / r.partition("#")[0] / "summary.json").read_text())["stages"][0][
            "val"
        ]["error"]
        for r in best["runs"]
    ]
    assert len(set(pool_val)) == len(pool_val)  # no tie: the choice below is a real one
    assert best["val"] == min(pool_val)


def test_a_test_result_that_is_nan_stops_compare_and_analyse_naming_its_run(tmp_path):
    """NaN has no place in a mean or a plot: recorded as null, it is refused where compare and analyse
    tabulate the runs, with the run named."""
    task = toy_task()
    evaluate = task.evaluate
    task.evaluate = lambda model, split: {
        **evaluate(model, split),
        **({"error": float("nan")} if split == "test" else {}),
    }
    with pytest.raises(
        procedures.TopdownError, match=r"^cascade-seed0#stage0: the test error .* is NaN or infinite"
    ):
        run_compare(task, tmp_path, seeds=1, config=CONFIG.updated({"cascade": {"splits": [2]}}))
    assert (
        json.loads((tmp_path / "runs" / "cascade-seed0" / "summary.json").read_text())["stages"][0]["test"][
            "error"
        ]
        is None
    )
    from topdown.analyse import run_analyse

    with pytest.raises(
        procedures.TopdownError, match=r"^baseline: the test error of stage 0 is NaN or infinite"
    ):
        run_analyse(task, tmp_path / "analyse", config=CONFIG, subsets=())
    assert [p.name for p in (tmp_path / "analyse" / "runs").iterdir()] == [
        "baseline"
    ]  # refused before the splits trained


def test_interrupted_compare_resumes_without_redoing_runs(tmp_path, monkeypatch):
    run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("summary.json")}
    calls = []
    real = procedures.run_procedure
    monkeypatch.setattr(
        procedures,
        "run_procedure",
        lambda proc, task, out, **kw: calls.append(out.name) or real(proc, task, out, **kw),
    )
    record = run_compare(toy_task(), tmp_path, seeds=2, config=CONFIG)
    assert all(name.endswith(("seed1", "seed1-extra1", "seed1-extra2")) for name in calls) and len(calls) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert record["seeds"] == 2


def test_a_run_interrupted_inside_a_comparison_is_resumed_from_where_it_stopped(tmp_path):
    """Ctrl-C in the middle of a run: the same comparison again continues that run from its last
    saved epoch (what it logged before stays as it was) and ends as an uninterrupted comparison does."""
    whole = run_compare(toy_task(), tmp_path / "whole", seeds=1, config=CONFIG)
    task, calls = toy_task(), []
    evaluate = task.evaluate

    def interrupted(model, split):
        calls.append(split)
        if len(calls) == 6:  # inside the cascade's stage 1, after stage 0 and stage 1's first epoch
            raise KeyboardInterrupt
        return evaluate(model, split)

    task.evaluate = interrupted
    with pytest.raises(KeyboardInterrupt):
        run_compare(task, tmp_path / "cut", seeds=1, config=CONFIG)
    run = tmp_path / "cut" / "runs" / "cascade-seed0"
    assert [s["index"] for s in json.loads((run / "summary.json").read_text())["stages"]] == [0]
    before = (run / "metrics.jsonl").read_text().splitlines()
    assert len(before) >= 3
    again = run_compare(toy_task(), tmp_path / "cut", seeds=1, config=CONFIG)
    assert (run / "metrics.jsonl").read_text().splitlines()[: len(before) - 1] == before[
        :-1
    ]  # seconds included
    assert without_seconds(again["arms"]) == without_seconds(whole["arms"])


def test_a_compare_continues_on_a_new_machine_from_the_committed_summaries(tmp_path, monkeypatch):
    """Only summary.json files are committed (never checkpoints): copied into a fresh directory,
    they let the comparison go on without training the finished runs again."""
    first = tmp_path / "first"
    record = run_compare(toy_task(), first, seeds=1, config=CONFIG)
    fresh = tmp_path / "fresh"
    for summary in (first / "runs").rglob("summary.json"):
        target = fresh / summary.relative_to(first)
        target.parent.mkdir(parents=True)
        target.write_bytes(summary.read_bytes())
    calls = []
    real = procedures.run_procedure
    monkeypatch.setattr(
        procedures,
        "run_procedure",
        lambda proc, task, out, **kw: calls.append(out.name) or real(proc, task, out, **kw),
    )
    again = run_compare(toy_task(), fresh, seeds=2, config=CONFIG)
    assert len(calls) == 4 and all("seed1" in name for name in calls)
    assert again["arms"]["cascade"]["per_seed"][0] == record["arms"]["cascade"]["per_seed"][0]
    # a checkpoint that is present is still checked: a damaged one is refused, not ignored
    # (a damaged best is restored from the chosen stage's checkpoint, when that one is intact)
    checkpoints = first / "runs" / "cascade-seed0" / "checkpoints"
    chosen = json.loads((first / "runs" / "cascade-seed0" / "summary.json").read_text())["chosen_stage"]
    (checkpoints / "best.safetensors").write_bytes(b"torn")
    run_compare(toy_task(), first, seeds=1, config=CONFIG)
    assert (checkpoints / "best.safetensors").read_bytes() == (
        checkpoints / f"stage-{chosen}.safetensors"
    ).read_bytes()
    (checkpoints / f"stage-{chosen}.safetensors").write_bytes(b"torn")
    with pytest.raises(procedures.TopdownError, match=f"stage-{chosen} are corrupt or missing"):
        run_compare(toy_task(), first, seeds=1, config=CONFIG)


def test_report_of_a_comparison_or_a_directory_of_runs_shows_where_each_run_stands(tmp_path):
    run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG)
    runs = tmp_path / "runs"
    summary = json.loads((runs / "cascade-seed0" / "summary.json").read_text())
    summary.update(status="running", stages=summary["stages"][:1])  # as if stopped in stage 1, epoch 1
    (runs / "cascade-seed0" / "summary.json").write_text(json.dumps(summary))
    (runs / "later").mkdir()
    table = cli("report", str(tmp_path), check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {
        "cascade-seed0",
        "equal-epochs-seed0",
        "baseline-seed0-extra1",
        "baseline-seed0-extra2",
        "later",
    }
    assert (
        "| running | 1 | stage 1, epoch 2 of 2, at most 0.0 h left in it |" in rows["cascade-seed0"]
    )  # the last epoch stage 1 logged
    assert "| complete | 1 | - |" in rows["equal-epochs-seed0"] and "| not started |" in rows["later"]
    assert (
        cli("report", str(runs), check=True).stdout == table
    )  # any directory of run directories (e.g. an ablation's)
    metrics = runs / "cascade-seed0" / "metrics.jsonl"  # as an older topdown wrote it: no budget recorded
    metrics.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "max_epochs"}) + "\n"
            for line in metrics.read_text().splitlines()
        )
    )
    assert "| running | 1 | stage 1, epoch 2 |" in cli("report", str(runs), check=True).stdout
    failed = cli("report", str(runs / "later"))  # neither a run nor a directory of runs
    assert failed.returncode != 0 and "holds no run" in failed.stderr


def test_report_of_a_comparison_in_progress_shows_the_arms_of_the_seeds_so_far(tmp_path):
    """Per seed whose cascade has finished, each arm whose runs have all finished, with the values
    compare.json gives."""
    record = run_compare(toy_task(), tmp_path, seeds=2, config=CONFIG)
    runs = tmp_path / "runs"
    for name in (
        "equal-epochs-seed1",
        "baseline-seed1-extra2",
    ):  # seed 1's equal-epochs arm and best-of-k not finished
        summary = json.loads((runs / name / "summary.json").read_text())
        (runs / name / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    out = cli("report", str(tmp_path), check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    per_seed = [
        [compare.format_metric(record["arms"][arm]["per_seed"][s]["test"], "error") for arm in ARMS]
        for s in (0, 1)
    ]
    assert rows[0] == "| 0 | " + " | ".join(per_seed[0]) + " |"
    assert rows[1] == f"| 1 | {per_seed[1][0]} | {per_seed[1][1]} | - | - |"
    cascade1 = json.loads((runs / "cascade-seed1" / "summary.json").read_text())
    cascade1["stages"][0]["test"]["error"] = (
        None  # a NaN recorded as null: that seed's row says so, the report goes on
    )
    (runs / "cascade-seed1" / "summary.json").write_text(json.dumps(cascade1))
    out = cli("report", str(tmp_path), check=True).stdout
    assert (
        "| 1 | cascade-seed1#stage0: the test error of stage 0 is NaN or infinite" in out and rows[0] in out
    )
    (runs / "cascade-seed0" / "summary.json").write_text(
        json.dumps({**json.loads((runs / "cascade-seed0" / "summary.json").read_text()), "status": "running"})
    )
    (runs / "cascade-seed1" / "summary.json").unlink()
    assert compare.finished_seeds(runs) is None  # no cascade finished: nothing to show


def test_finished_runs_made_with_another_config_are_refused_not_reused(tmp_path):
    run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG)
    before = (tmp_path / "compare.json").read_text()
    with pytest.raises(procedures.TopdownError, match=r"cascade-seed0: its 'config' \(train.lr\) differs"):
        run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG.updated({"train": {"lr": 0.02}}))
    with pytest.raises(procedures.TopdownError, match=r"its 'preset' \(recorded None, now 'demo'\) differs"):
        run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG, preset="demo")
    judged_otherwise = (
        toy_task()
    )  # a task whose metric changed since: its stages were accepted by another rule
    judged_otherwise.metric, judged_otherwise.lower_is_better = "loss", True
    with pytest.raises(
        procedures.TopdownError, match=r"cascade-seed0: its 'metric' \(recorded 'error', now 'loss'\) differs"
    ):
        run_compare(judged_otherwise, tmp_path, seeds=1, config=CONFIG)
    assert (tmp_path / "compare.json").read_text() == before


def test_analyse_every_split_from_one_baseline(tmp_path, monkeypatch):
    from topdown.analyse import run_analyse

    record = run_analyse(toy_task(), tmp_path, config=CONFIG, subsets=(0.5,))
    assert [r["split"] for r in record["rows"]] == [1, 2]
    base = json.loads((tmp_path / "runs" / "baseline" / "summary.json").read_text())["stages"][0]
    for row in record["rows"]:
        k = row["split"]
        for name in (
            f"retrain-classifier-k{k}",
            f"retrain-feature-extractor-k{k}",
            f"transfer-k{k}-subset0.5",
        ):
            first = json.loads((tmp_path / "runs" / name / "summary.json").read_text())["stages"][0]
            assert first["epochs"] == 0 and first["val"] == base["val"], (
                name
            )  # loaded from the baseline, not retrained
        rfe = json.loads(
            (tmp_path / "runs" / f"retrain-feature-extractor-k{k}" / "summary.json").read_text()
        )["stages"][1]
        assert rfe["frozen_blocks"] == ["inp", "mid", "out"][k:]
        assert row["subsets"]["0.5"]["transfer_classifier"]["test"] is not None
    assert (tmp_path / "analyse.md").is_file() and (tmp_path / "analyse.png").is_file()
    calls = []
    monkeypatch.setattr(procedures, "run_procedure", lambda *a, **kw: calls.append(a))
    assert run_analyse(toy_task(), tmp_path, config=CONFIG, subsets=(0.5,)) == record and not calls


def test_analyse_refuses_cascade_options_that_would_train_one_side_differently(tmp_path):
    from topdown.analyse import run_analyse

    tilted = CONFIG.updated({"cascade": {"candidates": 3, "reinit": False}})
    with pytest.raises(
        ConfigError,
        match=r"analyse: cascade.candidates, cascade.reinit would change only the "
        r"retrain-feature-extractor runs",
    ):
        run_analyse(toy_task(), tmp_path / "a", config=tilted)
    assert not (tmp_path / "a").exists()
    from topdown.analyse import check_one_recipe

    check_one_recipe(
        CONFIG.updated({"cascade": {"splits": [2]}})
    )  # a preset's splits: analyse sets them per split itself


def test_a_comparison_run_that_failed_before_saving_anything_starts_afresh_with_the_corrected_options(
    tmp_path,
):
    with pytest.raises(ConfigError, match="lack 'bleu'"):
        run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG.updated({"train": {"monitor": "bleu"}}))
    assert (
        run_compare(toy_task(), tmp_path, seeds=1, config=CONFIG)["arms"]["cascade"]["per_seed"][0]["test"]
        is not None
    )


def test_the_overview_figure_plots_the_paired_differences_compare_json_holds(tmp_path):
    """bench/overview.py draws README's comparisons from their compare.json: its differences are those
    files' numbers."""
    import subprocess
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import overview

    run_compare(toy_task(), tmp_path / "cmp", seeds=3, config=CONFIG)
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    diffs = overview.differences(record)
    assert list(diffs) == ["baseline", "baseline-equal-epochs", "best-of-k"]
    for arm, (per_seed, ci) in diffs.items():
        summary = record["arms"][arm]["cascade_minus_arm"]
        assert sum(per_seed) / 3 == pytest.approx(100 * summary["mean"]) and ci == pytest.approx(
            [100 * x for x in summary["ci95"]]
        )
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "overview.py"),
            str(tmp_path / "cmp"),
            "--out",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and (tmp_path / "o.png").stat().st_size > 0
    missing = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overview.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "no compare.json" in missing.stderr


def test_only_trains_the_named_runs_as_the_comparison_would(tmp_path, monkeypatch):
    """``--only``: a part of the comparison trained alone (its name, seed, recipe and budget), which
    the whole comparison then reuses; an equal-epochs run waits for its seed's cascade."""
    calls = []
    real = procedures.run_procedure
    monkeypatch.setattr(
        procedures,
        "run_procedure",
        lambda proc, task, out, **kw: calls.append((proc, out.name)) or real(proc, task, out, **kw),
    )
    with pytest.raises(ConfigError, match="equal-epochs-seed0 needs cascade-seed0 finished first"):
        run_only(toy_task(), tmp_path / "cmp", [equal_run(0)], seeds=1, config=CONFIG)
    with pytest.raises(
        ConfigError, match=r"--only baseline-seed1-extra1: not a run of this comparison \(cascade-seed0, "
    ):
        run_only(toy_task(), tmp_path / "cmp", [extra_run(1, 1)], seeds=1, config=CONFIG)
    assert calls == [] and not (tmp_path / "cmp").exists()
    done = run_only(toy_task(), tmp_path / "cmp", [extra_run(0, 2), cascade_run(0)], seeds=1, config=CONFIG)
    assert calls == [("baseline", "baseline-seed0-extra2"), ("cascade", "cascade-seed0")]
    assert (
        done[extra_run(0, 2)]["seed"] == extra_seed(0, 2) and not (tmp_path / "cmp" / "compare.json").exists()
    )
    run_only(toy_task(), tmp_path / "cmp", [equal_run(0)], seeds=1, config=CONFIG)
    assert calls[-1] == ("baseline", "equal-epochs-seed0")
    calls.clear()
    record = run_compare(toy_task(), tmp_path / "cmp", seeds=1, config=CONFIG)
    assert calls == [("baseline", "baseline-seed0-extra1")]  # the rest reused
    whole = run_compare(toy_task(), tmp_path / "whole", seeds=1, config=CONFIG)
    assert without_seconds(record["arms"]) == without_seconds(whole["arms"])


def test_a_runs_archive_is_deterministic_and_restores_the_finished_runs_a_comparison_lacks(
    tmp_path, monkeypatch
):
    made = run_compare(toy_task(), tmp_path / "made", seeds=1, config=CONFIG)
    runs, archive = tmp_path / "made" / "runs", tmp_path / "runs.tar.xz"
    unfinished = runs / "cascade-seed7"  # not finished: never packed
    unfinished.mkdir()
    (unfinished / "summary.json").write_text(json.dumps({"status": "running"}))
    assert cascade_run(7) not in pack_runs(runs, archive, "runs/")
    first = archive.read_bytes()
    pack_runs(runs, tmp_path / "again.tar.xz", "runs/")
    pack_runs(runs, archive, "runs/")  # packing again into the archive: the same bytes
    assert (tmp_path / "again.tar.xz").read_bytes() == first == archive.read_bytes()
    members = read_archive(archive)
    assert set(members) == {
        f"runs/{run.name}/{name}" for run in runs.iterdir() if run != unfinished for name in run_record(run)
    }
    assert {name.rsplit("/", 1)[1] for name in members} == {"summary.json", "metrics.jsonl", "report.md"}

    rebuilt = tmp_path / "rebuilt"
    (rebuilt / "runs" / cascade_run(0)).mkdir(parents=True)  # a run it holds is left as it is
    (rebuilt / "runs" / cascade_run(0) / "summary.json").write_bytes(
        (runs / cascade_run(0) / "summary.json").read_bytes()
    )
    assert cascade_run(0) not in restore_runs(archive, rebuilt / "runs")
    monkeypatch.setattr(procedures, "run_procedure", lambda *a, **kw: pytest.fail("trained a run"))
    again = run_compare(toy_task(), rebuilt, seeds=1, config=CONFIG)
    assert again["arms"] == made["arms"]  # seconds included: every number read from the archive

    for bad, pattern in [
        ({"runs/../x/summary.json": b"{}"}, "is not a plain file inside the archive"),
        ({"cascade-seed0/summary.json": b"{}"}, "is not runs/RUN/FILE"),
        ({"runs/cascade-seed0/summary.json": b"{"}, "not a readable summary.json"),
    ]:
        write_archive(tmp_path / "bad.tar.xz", bad)
        with pytest.raises(DataError, match=pattern):
            restore_runs(tmp_path / "bad.tar.xz", tmp_path / "x" / "runs")
    with pytest.raises(DataError, match="not a readable runs archive"):
        restore_runs(tmp_path / "made" / "compare.json", tmp_path / "x" / "runs")
    with pytest.raises(DataError, match="no such archive or directory"):
        restore_runs(tmp_path / "none.tar.xz", tmp_path / "x" / "runs")
    with pytest.raises(DataError, match="no runs in it"):
        restore_runs(tmp_path / "made", tmp_path / "x" / "runs")  # the comparison, not its runs/
    assert restore_runs(runs, tmp_path / "x" / "runs")  # a directory of runs is a source too


def test_committed_comparisons_reproduce_from_their_archives():
    """A committed comparison is its compare.* and one runs.tar.xz, from which it rebuilds without
    training."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import check_archives

    assert (
        check_archives.check(ROOT / "bench" / "results" / "digits-compare-demo-full-budget") == "same numbers"
    )
