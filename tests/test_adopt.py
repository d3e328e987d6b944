"""A comparison's arms take their baseline run's stage 0 (``topdown.adopt``) and end exactly where
training it again would have."""

import json

import pytest
from conftest import toy_task

from topdown.compare import run_compare
from topdown.config import RunConfig
from topdown.procedures import run_procedure

CONFIG = RunConfig.from_dict({"train": {"epochs": 2, "lr": 0.01}})
ROUNDS = {"procedure": {"rounds": 2}}  # shrink and perturb's own option: no stage 0 reads it


def summary(run):
    return json.loads((run / "summary.json").read_text())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def results(s):
    return [(st["role"], st["epochs"], st["val"], st["test"], st["accepted"]) for st in s["stages"]]


def test_the_arms_of_a_comparison_take_the_cascades_stage_zero_and_end_as_if_they_trained_it(tmp_path):
    run_compare(
        toy_task(),
        tmp_path / "cmp",
        seeds=1,
        config=CONFIG.updated(ROUNDS),
        arms=["cascade", "layerwise", "shrink-perturb"],
    )
    runs = tmp_path / "cmp" / "runs"
    cascade = summary(runs / "cascade-seed0")
    assert "adopted_from" not in cascade["stages"][0]
    for arm in ("layerwise", "shrink-perturb"):
        adopted = summary(runs / f"{arm}-seed0")
        first = adopted["stages"][0]
        assert first["adopted_from"] == "../cascade-seed0"
        assert (first["epochs"], first["val"], first["test"]) == tuple(
            cascade["stages"][0][k] for k in ("epochs", "val", "test")
        )
        assert (
            "| new model, trained in ../cascade-seed0 |" in (runs / f"{arm}-seed0" / "report.md").read_text()
        )
        assert [m for m in metrics(runs / f"{arm}-seed0") if m["stage"] == 0] == [
            m for m in metrics(runs / "cascade-seed0") if m["stage"] == 0
        ]
        # the same arm trained from scratch, alone: every stage the same, bit for bit
        alone = run_procedure(
            arm,
            toy_task(),
            tmp_path / f"{arm}-alone",
            config=CONFIG.updated(ROUNDS if arm == "shrink-perturb" else {}),
        )
        assert "adopted_from" not in alone["stages"][0]
        assert results(adopted) == results(alone) and adopted["test"] == alone["test"]


def test_a_stage_zero_of_another_training_or_not_finished_is_trained_not_adopted(tmp_path):
    donor = tmp_path / "donor"
    lr = CONFIG.updated({"train": {"lr": 0.02}})
    run_procedure("baseline", toy_task(), donor, config=lr)

    def layerwise(name, config, seed=0, baseline_from=donor):
        return run_procedure(
            "layerwise", toy_task(), tmp_path / name, config=config, seed=seed, baseline_from=baseline_from
        )

    other_recipe, other_seed = layerwise("a", CONFIG), layerwise("b", lr, seed=1)
    missing = layerwise("c", lr, baseline_from=tmp_path / "none")
    for s in (other_recipe, other_seed, missing):
        assert "adopted_from" not in s["stages"][0]
    # the same recipe and seed, another procedure: adopted
    same = layerwise("d", lr)
    assert same["stages"][0]["adopted_from"] == "../donor"
    assert same["stages"][0]["test"] == summary(donor)["stages"][0]["test"]
    # a damaged checkpoint (its checksum no longer matches): trained, not adopted
    checkpoint = donor / "checkpoints" / "stage-0.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-8] + b"\0" * 8)
    assert "adopted_from" not in layerwise("e", lr)["stages"][0]


def test_knowledge_evolution_trains_its_own_stage_zero_to_report_its_slim_model(tmp_path):
    donor = tmp_path / "donor"
    run_procedure("baseline", toy_task(), donor, config=CONFIG)
    ke = run_procedure(
        "knowledge-evolution", toy_task(), tmp_path / "ke", config=CONFIG.updated(ROUNDS), baseline_from=donor
    )
    assert "adopted_from" not in ke["stages"][0] and "slim" in ke["stages"][0]["reported"]


def test_an_arm_interrupted_in_its_own_stage_zero_adopts_on_resume_and_keeps_only_the_adopted_lines(
    tmp_path,
):
    """An arm that started before its baseline run's stage 0 had finished, then was interrupted."""
    task, calls = toy_task(), []
    evaluate = task.evaluate

    def interrupted(model, split):
        calls.append(split)
        if len(calls) == 2:  # in stage 0, after its first epoch
            raise KeyboardInterrupt
        return evaluate(model, split)

    task.evaluate = interrupted
    donor, arm = tmp_path / "base", tmp_path / "arm"
    with pytest.raises(KeyboardInterrupt):
        run_procedure("layerwise", task, arm, config=CONFIG, baseline_from=donor)
    assert [m["stage"] for m in metrics(arm)] == [0]
    run_procedure("baseline", toy_task(), donor, config=CONFIG)
    resumed = run_procedure("layerwise", toy_task(), arm, config=CONFIG, baseline_from=donor, resume=True)
    assert resumed["stages"][0]["adopted_from"] == "../base"
    assert [m for m in metrics(arm) if m["stage"] == 0] == metrics(donor)
    assert not list((arm / "state").glob("stage-0-*"))
