"""The four procedures through the Python API: stage records, acceptance, checkpoints, determinism."""

import dataclasses
import json

import pytest
import torch
from conftest import ToyNet, read_summary, toy_task, without_seconds
from safetensors.torch import load_file

import topdown
import topdown.procedures as procedures
from topdown import Blocks, CascadeConfig, ConfigError, TrainConfig

FAST = TrainConfig(epochs=2, lr=0.01)


def ckpt(run, name):
    return load_file(str(run / "checkpoints" / f"{name}.safetensors"))


def test_cascade_record_and_checkpoints(tmp_path, task):
    run = tmp_path / "run"
    summary = topdown.cascade(task, run, train=FAST, seed=3)
    assert summary == read_summary(run)
    assert summary["status"] == "complete" and summary["procedure"] == "cascade" and summary["seed"] == 3
    assert summary["metric"] == "error" and summary["lower_is_better"] is True
    assert summary["blocks"]["mid"] == ["mid.0.weight", "mid.0.bias", "mid.1.weight", "mid.1.bias"]
    stages = summary["stages"]
    assert [s["split"] for s in stages] == [None, 2, 1]
    assert [s["trained_blocks"] for s in stages] == [["inp", "mid", "out"], ["inp", "mid"], ["inp"]]
    assert [s["frozen_blocks"] for s in stages] == [[], ["out"], ["mid", "out"]]
    for s in stages:
        assert set(s) >= {
            "index",
            "split",
            "trained_blocks",
            "frozen_blocks",
            "epochs",
            "val",
            "accepted",
            "seconds",
        }
        assert s["epochs"] == 2 and 0 <= s["val"]["error"] <= 1
        assert (run / "checkpoints" / f"stage-{s['index']}.safetensors").is_file()
    # acceptance follows validation, and the chosen stage is the best accepted one
    best = stages[0]["val"]["error"]
    for s in stages[1:]:
        assert s["accepted"] == (s["val"]["error"] < best)
        best = min(best, s["val"]["error"]) if s["accepted"] else best
    chosen = summary["chosen_stage"]
    assert stages[chosen]["val"]["error"] == best and summary["test"] == stages[chosen]["test"]
    assert all(
        torch.equal(a, b) for a, b in zip(ckpt(run, "best").values(), ckpt(run, f"stage-{chosen}").values())
    )
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    assert (run / "report.md").is_file() and (run / "curves.png").stat().st_size > 1000
    assert not list((run / "state").glob("*"))  # resume points are removed once stages are recorded


def test_upper_blocks_come_from_the_best_model_and_lower_blocks_are_fresh(tmp_path, task):
    run = tmp_path / "run"
    topdown.cascade(task, run, train=FAST, cascade=CascadeConfig(splits=[2]), seed=0)
    s0, s1 = ckpt(run, "stage-0"), ckpt(run, "stage-1")
    blocks = Blocks(task.build_model(), task.blocks)
    for key in blocks.state_keys(["out"]):
        assert torch.equal(s0[key], s1[key]), key
    for key in blocks.state_keys(["inp", "mid"]):
        if key.endswith("weight"):
            assert not torch.equal(s0[key], s1[key]), key


def test_reinit_draws_from_the_models_own_initialisation(tmp_path):
    """With zero epochs of change (lr 0), the re-initialised block equals a fresh model's block."""
    task = toy_task()
    run = tmp_path / "run"
    topdown.cascade(task, run, train=TrainConfig(epochs=1, lr=0.0), cascade=CascadeConfig(splits=[1]), seed=0)
    s0, s1 = ckpt(run, "stage-0"), ckpt(run, "stage-1")
    fresh_weight = s1["inp.0.weight"]
    assert not torch.equal(fresh_weight, s0["inp.0.weight"])
    bound = 1 / 8**0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert fresh_weight.abs().max() <= bound and fresh_weight.std() > bound / 3
    # not merely in range: the block is what the model's own builder gives, seeded with the stage's seed ...
    seed = read_summary(run)["stages"][1]["candidates"][0]["seed"]
    torch.manual_seed(seed)
    built = task.build_model().state_dict()
    for key in ("inp.0.weight", "inp.0.bias", "inp.1.weight", "inp.1.bias"):
        assert torch.equal(s1[key], built[key]), key

    # ... and a builder with its own, distinctive scheme is followed (not nn.Linear's default)
    def build_model():
        model = ToyNet()
        torch.nn.init.uniform_(
            model.inp[0].weight, 2.0, 3.0
        )  # drawn from torch's RNG, far from U(-bound, bound)
        return model

    custom = dataclasses.replace(task, build_model=build_model)
    run = tmp_path / "custom"
    topdown.cascade(
        custom, run, train=TrainConfig(epochs=1, lr=0.0), cascade=CascadeConfig(splits=[1]), seed=0
    )
    s0, s1 = ckpt(run, "stage-0"), ckpt(run, "stage-1")
    torch.manual_seed(read_summary(run)["stages"][1]["candidates"][0]["seed"])
    built = build_model().state_dict()
    assert torch.equal(s1["inp.0.weight"], built["inp.0.weight"]) and torch.equal(
        s1["inp.0.bias"], built["inp.0.bias"]
    )
    assert s1["inp.0.weight"].min() >= 2.0 and not torch.equal(s1["inp.0.weight"], s0["inp.0.weight"])


def test_worse_stage_is_rejected_and_best_is_kept(tmp_path):
    # validation error per evaluation: stage 0 ends at 0.2, stage 1 at 0.5 (worse), stage 2 at 0.1
    task = toy_task(metric_script=[0.3, 0.2, 0.6, 0.5, 0.4, 0.1])
    run = tmp_path / "run"
    summary = topdown.cascade(task, run, train=FAST, seed=0)
    assert [s["accepted"] for s in summary["stages"]] == [True, False, True]
    assert [s["val"]["error"] for s in summary["stages"]] == [0.2, 0.5, 0.1]
    assert summary["chosen_stage"] == 2
    # stage 2 started from stage 0 (the best when it began), not from the rejected stage 1
    s0, s2 = ckpt(run, "stage-0"), ckpt(run, "stage-2")
    assert all(torch.equal(s0[k], s2[k]) for k in s0 if k.startswith(("mid.", "out.")))


def test_patience_stops_after_rejections(tmp_path):
    task = toy_task(metric_script=[0.2, 0.1, 0.5, 0.5, 0.5, 0.5])
    summary = topdown.cascade(task, tmp_path / "run", train=FAST, cascade=CascadeConfig(patience=1), seed=0)
    assert len(summary["stages"]) == 2 and summary["chosen_stage"] == 0


def test_candidates_and_finetune(tmp_path, task):
    cc = CascadeConfig(splits=[2], candidates=2, finetune_epochs=1)
    summary = topdown.cascade(task, tmp_path / "run", train=FAST, cascade=cc, seed=0)
    stage1, finetune = summary["stages"][1], summary["stages"][2]
    assert len(stage1["candidates"]) == 2 and stage1["epochs"] == 4
    assert stage1["candidates"][0]["seed"] != stage1["candidates"][1]["seed"]
    assert stage1["val"]["error"] == min(c["val"]["error"] for c in stage1["candidates"])
    assert finetune["role"] == "finetune" and finetune["epochs"] == 1 and finetune["frozen_blocks"] == []


def test_warm_start_ablation_keeps_lower_blocks(tmp_path, task):
    run = tmp_path / "run"
    topdown.cascade(
        task,
        run,
        train=TrainConfig(epochs=1, lr=0.0),
        cascade=CascadeConfig(splits=[1], reinit=False),
        seed=0,
    )
    s0, s1 = ckpt(run, "stage-0"), ckpt(run, "stage-1")
    assert torch.equal(s0["inp.0.weight"], s1["inp.0.weight"])


def test_retrain_classifier_freezes_the_feature_extractor(tmp_path, task):
    run = tmp_path / "run"
    summary = topdown.retrain_classifier(task, run, split=1, train=FAST, seed=0)
    s1 = summary["stages"][1]
    assert (
        s1["role"] == "retrain-classifier"
        and s1["trained_blocks"] == ["mid", "out"]
        and s1["frozen_blocks"] == ["inp"]
    )
    a, b = ckpt(run, "stage-0"), ckpt(run, "stage-1")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("inp."))
    assert not torch.equal(a["out.weight"], b["out.weight"])


def test_transfer_classifier(tmp_path, task):
    run = tmp_path / "run"
    summary = topdown.transfer_classifier(task, run, split=2, subset=0.5, train=FAST, seed=0)
    roles = [s["role"] for s in summary["stages"]]
    assert roles == ["full-data baseline", "subset baseline", "transfer"]
    assert [s["subset"] for s in summary["stages"]] == [1.0, 0.5, 0.5]
    assert summary["stages"][0]["accepted"] is False and summary["chosen_stage"] in (1, 2)
    full, transfer = ckpt(run, "stage-0"), ckpt(run, "stage-2")
    assert torch.equal(full["out.weight"], transfer["out.weight"])


def test_same_seed_same_summary(tmp_path, task):
    a = topdown.cascade(task, tmp_path / "a", train=FAST, seed=7)
    b = topdown.cascade(toy_task(), tmp_path / "b", train=FAST, seed=7)
    c = topdown.cascade(toy_task(), tmp_path / "c", train=FAST, seed=8)
    assert without_seconds(a) == without_seconds(b)
    assert without_seconds(a)["stages"] != without_seconds(c)["stages"]


def test_option_errors_come_before_training(tmp_path, task):
    for kw, match in [
        (lambda: dict(cascade=CascadeConfig(splits=[1, 2])), "strictly descending"),
        (
            lambda: dict(cascade=CascadeConfig(splits=[3])),
            r"split 3 is out of range: the model has 3 blocks, so 1..2",
        ),
        (lambda: dict(cascade=CascadeConfig(candidates=0)), "candidates"),
    ]:
        with pytest.raises(ConfigError, match=match):  # refused when the option is declared, or by the plan
            topdown.cascade(task, tmp_path / match.replace(" ", "_"), train=FAST, **kw())
    with pytest.raises(ConfigError, match="out of range"):
        topdown.retrain_classifier(task, tmp_path / "r", split=3)
    with pytest.raises(ConfigError, match="subset"):
        topdown.transfer_classifier(task, tmp_path / "t", split=1, subset=1.5)
    with pytest.raises(ConfigError, match="baseline trains from scratch"):
        topdown.baseline(task, tmp_path / "b", train=FAST, from_checkpoint="x.safetensors")
    assert not (tmp_path / "strictly_descending").exists() and not (tmp_path / "b").exists()


def test_existing_run_is_not_overwritten(tmp_path, task):
    run = tmp_path / "run"
    topdown.baseline(task, run, train=FAST)
    before = (run / "summary.json").read_text()
    with pytest.raises(topdown.TopdownError, match="already holds a run"):
        topdown.baseline(task, run, train=FAST)
    with pytest.raises(topdown.TopdownError, match="differs"):
        topdown.baseline(task, run, train=TrainConfig(epochs=3), resume=True)
    assert (run / "summary.json").read_text() == before
    assert json.loads(before)["stages"][0]["epochs"] == 2


def test_an_error_in_the_task_s_own_code_is_on_record_and_the_run_resumes(tmp_path):
    """A bug in a task's loss (not an error of ours) ends the run as failed, its lock released: the
    same process resumes it once the bug is gone."""
    task, calls = toy_task(), {"n": 0}
    loss = task.loss

    def buggy(model, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # in stage 1: stage 0 is on disk
            raise KeyError("a bug in the task's code")
        return loss(model, batch)

    run = tmp_path / "run"
    with pytest.raises(KeyError, match="a bug"):
        topdown.cascade(dataclasses.replace(task, loss=buggy), run, train=FAST)
    failed = read_summary(run)
    assert failed["status"] == "failed" and len(failed["stages"]) == 1
    assert topdown.cascade(task, run, train=FAST, resume=True)["status"] == "complete"


def test_a_run_that_failed_before_saving_any_training_does_not_block_the_corrected_command(tmp_path, task):
    """A monitor the task does not report fails at the first validation, before anything is saved:
    the same directory then takes the corrected command (a failed run that saved epochs still does not)."""
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="lack 'bleu'"):
        topdown.baseline(task, run, train=TrainConfig(epochs=2, monitor="bleu"))
    assert read_summary(run)["status"] == "failed"
    assert topdown.baseline(task, run, train=FAST)["status"] == "complete"

    kept = tmp_path / "kept"
    topdown.baseline(task, kept, train=FAST)
    summary = read_summary(kept)
    (kept / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    with pytest.raises(topdown.TopdownError, match="already holds a run"):
        topdown.baseline(task, kept, train=FAST)


def test_running_out_of_memory_is_the_users_to_fix_and_the_run_resumes(tmp_path, task):
    """A batch too large for the device: a one-line TrainingError, the run marked failed with its
    finished stages kept, not a traceback reported as a bug of ours."""
    loss, calls = task.loss, [0]

    def hungry(model, batch):
        calls[0] += 1
        if calls[0] > 12:  # in stage 1, after the baseline is saved
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return loss(model, batch)

    task.loss = hungry
    with pytest.raises(
        topdown.TrainingError,
        match=r"^out of memory on cpu \(CUDA out of memory. Tried to allocate 20.00 GiB\); "
        r"a smaller data.batch_size",
    ):
        topdown.cascade(task, tmp_path / "run", train=FAST)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and len(summary["stages"]) == 1
    task.loss = loss
    assert topdown.cascade(task, tmp_path / "run", train=FAST, resume=True)["status"] == "complete"


def test_a_monitor_of_unknown_direction_is_refused_before_the_run_directory_is_written(tmp_path, task):
    with pytest.raises(
        ConfigError, match=r"train.monitor 'null': not a metric whose direction is known .*leave it empty"
    ):
        topdown.baseline(task, tmp_path / "run", train=TrainConfig(epochs=1, monitor="null"))
    assert not (tmp_path / "run").exists()


def test_a_procedure_option_the_plan_does_not_read_is_refused_not_ignored(tmp_path, task):
    """A library user's Cascade given procedure.split would otherwise train every split silently."""
    from topdown.config import RunConfig

    model = task.build_model()
    with pytest.raises(
        ConfigError,
        match=r"cascade does not use procedure.split \(it uses no procedure.\* option\); "
        r"a cascade's splits are cascade.splits",
    ):
        topdown.Cascade(
            model,
            task.blocks,
            build_model=task.build_model,
            metric="error",
            out=tmp_path / "c",
            config={"procedure": {"split": 1}},
        )
    with pytest.raises(
        ConfigError, match=r"retrain-classifier does not use procedure.subset \(it uses procedure.split\)"
    ):
        procedures.RetrainClassifier(
            model,
            task.blocks,
            build_model=task.build_model,
            metric="error",
            out=tmp_path / "r",
            config=RunConfig.from_dict({"procedure": {"split": 1, "subset": 0.5}}),
        )
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_starting_from_a_checkpoint_trained_on_other_data_is_said(tmp_path, task, capsys):
    topdown.baseline(task, tmp_path / "a", train=FAST)
    ckpt = str(tmp_path / "a" / "checkpoints" / "best.safetensors")
    topdown.retrain_classifier(task, tmp_path / "same", split=2, train=FAST, from_checkpoint=ckpt)
    assert "trained on other data" not in capsys.readouterr().err
    other = toy_task()
    other.info = {"data": "another corpus"}
    topdown.retrain_classifier(other, tmp_path / "other", split=2, train=FAST, from_checkpoint=ckpt)
    assert "was trained on other data than this run ('task_info' (data) differ)" in capsys.readouterr().err


def test_a_checkpoint_saved_by_another_tool_is_a_starting_point(tmp_path, task):
    """safetensors files written elsewhere carry plain-string metadata (e.g. {"format": "pt"}), not
    our JSON."""
    from safetensors.torch import save_file

    path = tmp_path / "theirs.safetensors"
    save_file(
        {k: v.contiguous() for k, v in task.build_model().state_dict().items()},
        str(path),
        metadata={"format": "pt"},
    )
    summary = topdown.retrain_classifier(
        task, tmp_path / "rc", split=2, train=FAST, from_checkpoint=str(path)
    )
    assert summary["status"] == "complete" and summary["stages"][0]["source"] == str(path)


def test_a_run_built_on_a_checkpoint_is_not_continued_or_reused_from_other_weights(tmp_path, task):
    """analyse's runs start from its baseline's checkpoint: if that baseline is trained again (other
    weights), a finished run built on the old one must not be read back as built on the new one."""
    topdown.baseline(task, tmp_path / "a", train=FAST)
    topdown.baseline(task, tmp_path / "b", train=FAST, seed=1)
    a, b = (str(tmp_path / n / "checkpoints" / "best.safetensors") for n in "ab")
    run = tmp_path / "rc"
    config = topdown.RunConfig.from_dict({"train": {"epochs": 2, "lr": 0.01}, "procedure": {"split": 2}})
    procedures.run_or_resume("retrain-classifier", task, run, config=config, from_checkpoint=a)
    assert (
        procedures.run_or_resume("retrain-classifier", task, run, config=config, from_checkpoint=a)["status"]
        == "complete"
    )
    with pytest.raises(
        topdown.TopdownError,
        match=r"cannot reuse .*: it started from other weights than .*b/checkpoints/best.safetensors",
    ):
        procedures.run_or_resume("retrain-classifier", task, run, config=config, from_checkpoint=b)
    with pytest.raises(topdown.TopdownError, match="cannot resume .*: it started from other weights"):
        topdown.retrain_classifier(task, run, split=2, train=config.train, from_checkpoint=b, resume=True)
    (tmp_path / "a" / "checkpoints" / "best.safetensors").rename(
        tmp_path / "moved.safetensors"
    )  # stage 0 is recorded: not needed
    assert (
        topdown.retrain_classifier(task, run, split=2, train=config.train, from_checkpoint=a, resume=True)[
            "status"
        ]
        == "complete"
    )
    # nor is a run that trained its own baseline taken for one built on a checkpoint
    topdown.retrain_classifier(task, tmp_path / "own", split=2, train=config.train)
    with pytest.raises(
        topdown.TopdownError,
        match=r"cannot resume .*own: it trained its own baseline, not the model in .*b/checkpoints",
    ):
        topdown.retrain_classifier(
            task, tmp_path / "own", split=2, train=config.train, from_checkpoint=b, resume=True
        )


def test_only_the_data_description_tolerates_float_rounding():
    """task_info statistics may differ in their last bits on another CPU; an option's value may not."""
    from topdown.identity import first_difference

    assert (
        first_difference({"task_info": {"mean": [0.5]}}, {"task_info": {"mean": [0.5 * (1 + 1e-7)]}}) is None
    )
    assert first_difference({"config": {"wd": 1.2e-6}}, {"config": {"wd": 1.15e-6}}) == "'config' (wd)"
    assert first_difference({"config": {"lr": 30.0}}, {"config": {"lr": 30.0003}}) == "'config' (lr)"


def test_a_run_recorded_before_an_option_existed_resumes_at_that_options_default(tmp_path, task):
    """A run made by an older version lacks the options added since; it behaved as their defaults,
    so continuing it with the defaults is allowed, and with anything else is refused."""
    run = tmp_path / "run"
    topdown.baseline(task, run, train=FAST)
    summary = json.loads((run / "summary.json").read_text())
    del summary["config"]["train"]["average_best"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert topdown.baseline(task, run, train=FAST, resume=True)["status"] == "complete"
    with pytest.raises(topdown.TopdownError, match=r"'config' \(train.average_best\) differs"):
        topdown.baseline(task, run, train=FAST.replace(average_best=2), resume=True)


def test_forget_reinitialises_the_upper_blocks_and_trains_all_round_after_round(tmp_path, task):
    run = tmp_path / "run"
    summary = topdown.forget(
        task, run, train=FAST, seed=0
    )  # defaults: the cascade's first split (2) and stages (2)
    stages = summary["stages"]
    assert [(s["role"], s["split"], s.get("reinit_blocks")) for s in stages] == [
        ("baseline", None, None),
        ("forget", 2, ["out"]),
        ("forget", 2, ["out"]),
    ]
    assert all(s["trained_blocks"] == ["inp", "mid", "out"] and not s["frozen_blocks"] for s in stages)
    # each round starts from the round before (the lower blocks go on learning; lr 0 keeps them as
    # they started)
    still = tmp_path / "still"
    topdown.forget(task, still, train=TrainConfig(epochs=1, lr=0.0), seed=0, rounds=1)
    s0, s1 = ckpt(still, "stage-0"), ckpt(still, "stage-1")
    assert torch.equal(s0["mid.0.weight"], s1["mid.0.weight"]) and not torch.equal(
        s0["out.weight"], s1["out.weight"]
    )
    # validation chooses among the rounds, and the baseline is the cascade's stage 0, bit for bit
    chosen = summary["chosen_stage"]
    assert all(stages[chosen]["val"]["error"] <= s["val"]["error"] for s in stages)
    cascade = topdown.cascade(task, tmp_path / "cascade", train=FAST, seed=0)
    assert stages[0]["val"] == cascade["stages"][0]["val"] and sum(s["epochs"] for s in stages) == sum(
        s["epochs"] for s in cascade["stages"]
    )
    forget0, cascade0 = ckpt(run, "stage-0"), ckpt(tmp_path / "cascade", "stage-0")
    assert forget0.keys() == cascade0.keys()
    for key in forget0:  # the weights themselves, not just their validation metrics
        assert torch.equal(forget0[key], cascade0[key]), key
    with pytest.raises(ConfigError, match="split 3 is out of range"):
        topdown.forget(task, tmp_path / "bad", split=3, train=FAST)
