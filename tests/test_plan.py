"""The plan of stages driven by a hand-written loop: frozen invariants, acceptance, resume after
SIGKILL, the README example, and our own executor as just one driver of the same plans."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import PYTHONPATH, ROOT, ToyNet, read_summary, toy_data, toy_task, without_seconds
from torch import nn
from torch.nn import functional as F

import topdown
from topdown import CascadeConfig, RunConfig, TrainConfig
from topdown.loop import fit

BLOCKS = [("inp", ["inp"]), ("mid", ["mid"]), ("out", ["out"])]


def my_training(model: nn.Module, params: list[nn.Parameter], epochs: int = 2) -> None:
    """A user's own loop: plain SGD over the toy data, nothing from topdown."""
    x, y = toy_data()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for i in range(0, 128, 32):
            loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()


def val_error(model: nn.Module) -> float:
    x, y = toy_data()
    model.eval()
    with torch.no_grad():
        return (model(x[128:160]).argmax(1) != y[128:160]).float().mean().item()


def new_plan(out, **kw) -> topdown.Cascade:
    torch.manual_seed(0)
    return topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=out, **kw)


def test_a_hand_written_loop_drives_a_cascade_with_frozen_blocks_truly_frozen(tmp_path):
    plan = new_plan(tmp_path / "run")
    seen = []
    for stage in plan:
        model = stage.model
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b.clone() for n, b in model.named_buffers() if n.split(".")[0] in stage.frozen_blocks}
        trainable = {id(p) for p in stage.trainable_parameters()}
        assert trainable == {
            id(p) for n, p in model.named_parameters() if n.split(".")[0] in stage.trained_blocks
        }
        my_training(model, stage.trainable_parameters())
        model.train()  # frozen normalisation and dropout stay in eval mode anyway
        for block in stage.frozen_blocks:
            assert all(not m.training for m in getattr(model, block).modules())
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        assert all(
            torch.equal(b, buffers[n]) for n, b in model.named_buffers() if n in buffers
        )  # BatchNorm statistics
        record = stage.finish(val={"error": val_error(model)})
        assert record["accepted"] == stage.accepted and record["index"] == stage.index
        seen.append((stage.index, stage.trained_blocks))
    assert seen == [(0, ["inp", "mid", "out"]), (1, ["inp", "mid"]), (2, ["inp"])]
    summary = read_summary(tmp_path / "run")
    assert summary == plan.summary and summary["status"] == "complete" and summary["procedure"] == "cascade"
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file() and (
        tmp_path / "run" / "report.md"
    ).is_file()
    # the model comes back as the chosen one, every block trainable again
    best = topdown.files.load_tensors(tmp_path / "run" / "checkpoints" / "best.safetensors")[0]
    assert all(torch.equal(v, best[k]) for k, v in plan.model.state_dict().items())
    assert all(p.requires_grad for p in plan.model.parameters())


def test_a_plan_without_a_run_directory_runs_in_memory_and_writes_nothing(tmp_path, monkeypatch):
    """Without ``out`` the plan is the method alone: the same stages, decisions and record as a
    plan that writes a run directory, later stages starting from weights kept in memory."""
    (tmp_path / "in-memory").mkdir()
    monkeypatch.chdir(tmp_path / "in-memory")  # where a relative path would land
    plans = {}
    for out in (None, tmp_path / "on-disk"):
        plan = plans[out is None] = new_plan(out, config={"cascade": {"candidates": 2}})
        for stage in plan:
            assert (stage.resume_path is None) == (out is None)
            if stage.index > 0:  # the frozen classifier is the chosen stage's, from memory or from disk
                chosen = plan.record.stage_weights(plan.best_index)
                state = stage.model.state_dict()
                assert all(torch.equal(state[k], chosen[k]) for k in chosen if k.startswith("out."))
            torch.manual_seed(stage.seed)
            my_training(stage.model, stage.trainable_parameters(), epochs=1)
            stage.log({"epoch": 1, "val": {"error": val_error(stage.model)}})
            stage.finish(val={"error": val_error(stage.model)}, test={"error": 0.5})
    memory, disk = plans[True], plans[False]
    assert list((tmp_path / "in-memory").iterdir()) == [] and len(list(tmp_path.iterdir())) == 2
    assert memory.summary["status"] == "complete" and "checksums" not in memory.summary
    assert without_seconds(memory.summary) == without_seconds(
        {k: v for k, v in read_summary(tmp_path / "on-disk").items() if k != "checksums"}
    )
    assert all(torch.equal(v, disk.model.state_dict()[k]) for k, v in memory.model.state_dict().items())
    with pytest.raises(topdown.ConfigError, match=r"resume=True continues a run directory.*\(out=\.\.\.\)"):
        new_plan(None, resume=True)


def test_an_accept_rule_is_named_and_a_misspelt_one_is_refused(tmp_path):
    assert topdown.StageSpec("x", (), accept="always").accept is topdown.Accept.ALWAYS
    assert topdown.StageSpec("x", ()).accept is topdown.Accept.BETTER

    class Misspelt(topdown.Plan):
        def stages(self):
            yield topdown.StageSpec("baseline", self.all_blocks(), accept="alwyas")

    torch.manual_seed(0)
    plan = Misspelt(ToyNet(), BLOCKS, build_model=ToyNet, metric="error")
    with pytest.raises(
        topdown.ConfigError,
        match=r"^unknown accept rule 'alwyas'; a stage's accept is one of 'better', 'always', 'never'$",
    ):
        next(iter(plan))


def test_acceptance_and_rejection_follow_the_reported_validation_metric(tmp_path):
    script = iter([0.3, 0.4, 0.1])  # stage 1 is worse than stage 0 (rejected), stage 2 better (accepted)
    plan = new_plan(tmp_path / "run")
    for stage in plan:
        stage.finish(val={"error": next(script), "accuracy": 0.5}, test={"error": 0.25})
    assert [s["accepted"] for s in plan.summary["stages"]] == [True, False, True]
    assert plan.summary["chosen_stage"] == 2 and plan.summary["test"] == {"error": 0.25}


def test_a_higher_is_better_metric_is_known_by_its_name(tmp_path):
    script = iter([0.7, 0.6, 0.9])
    torch.manual_seed(0)
    plan = topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="accuracy", out=tmp_path / "acc")
    for stage in plan:
        stage.finish(val={"accuracy": next(script)})
    assert [s["accepted"] for s in plan.summary["stages"]] == [True, False, True]
    assert plan.summary["lower_is_better"] is False
    with pytest.raises(topdown.ConfigError, match="direction is unknown"):
        topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="my_score", out=tmp_path / "x")
    # a variant of a known metric (another decoder's WER, a dev-set BLEU) takes its base's direction and unit
    from topdown.metrics import Metric, display_scale, is_rate

    assert [Metric.named(n).lower_is_better for n in ("wer_beam", "cer_lm", "ctc_loss", "bleu_dev")] == [
        True,
        True,
        True,
        False,
    ]
    assert [is_rate(n) for n in ("wer_beam", "error", "ppl", "loss")] == [True, True, False, False]
    assert [display_scale(n) for n in ("cer_lm", "ppl")] == [(100, " (%)"), (1, "")]


def test_unfinished_stage_and_missing_metric_are_errors(tmp_path):
    plan = new_plan(tmp_path / "run")
    stages = iter(plan)
    first = next(stages)
    with pytest.raises(topdown.ConfigError, match="lack the plan's metric 'error'"):
        first.finish(val={"loss": 1.0})
    with pytest.raises(topdown.TopdownError, match="was not finished"):
        next(stages)


def test_what_a_loop_hands_back_is_checked_where_it_is_handed(tmp_path):
    """A loop's mistakes are one-line TopdownErrors at the call that makes them, never a bare
    traceback later nor a silently wrong record."""
    plan = new_plan(
        tmp_path / "run", config={"cascade": {"splits": [2]}}
    )  # a plain dict configures the plan too
    stages = iter(plan)
    first = next(stages)
    with pytest.raises(
        topdown.ConfigError,
        match=r"stage.log needs 'epoch' \(an int\) and 'val'.*got \{'epoch': None, 'val': None\}",
    ):
        first.log({"val_error": 0.5})
    with pytest.raises(topdown.ConfigError, match=r"metric 'confusion' is a tensor or array of 4 values"):
        first.log({"epoch": 1, "val": {"error": 0.5}, "confusion": torch.zeros(2, 2)})
    with pytest.raises(
        topdown.ConfigError, match=r"the test metrics \['loss'\] lack the plan's metric 'error'"
    ):
        first.finish(val={"error": 0.5}, test={"loss": 1.0})
    with pytest.raises(topdown.TopdownError, match="validation error is NaN or infinite: the stage diverged"):
        first.finish(
            val={"error": float("nan")}
        )  # a NaN would lose every comparison, and an infinity could be chosen
    with pytest.raises(topdown.ConfigError, match="validation error must be a number, got 'low'"):
        first.finish(val={"error": "low"})
    first.log(
        {"epoch": torch.tensor(1), "val": {"error": torch.tensor(0.25)}, "train_loss": torch.tensor(1.5)}
    )
    first.finish(
        val={"error": torch.tensor(0.25)}, test={"error": torch.tensor(0.5), "loss": float("inf")}
    )  # torchmetrics hands tensors
    second = next(stages)
    second.finish(val={"error": 0.5})
    assert list(stages) == [] and plan.summary["test"] == {
        "error": 0.5,
        "loss": None,
    }  # strict JSON: no NaN or Infinity
    assert read_summary(tmp_path / "run")["stages"][0]["test"] == {"error": 0.5, "loss": None}
    assert (
        '"epoch": 1, "val": {"error": 0.25}, "train_loss": 1.5'
        in (tmp_path / "run" / "metrics.jsonl").read_text()
    )


def test_a_plan_refuses_what_cannot_work_before_any_stage(tmp_path):
    with pytest.raises(topdown.ConfigError, match="declared over another model than the plan's"):
        topdown.Cascade(
            ToyNet(),
            topdown.Blocks(ToyNet(), BLOCKS),
            build_model=ToyNet,
            metric="error",
            out=tmp_path / "other",
        )
    with pytest.raises(
        topdown.ConfigError, match="build_model must be a function that returns a freshly built model"
    ):
        topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet(), metric="error", out=tmp_path / "a")

    class Wider(ToyNet):
        def __init__(self):
            super().__init__()
            self.mid[0] = nn.Linear(16, 17)

    plan = topdown.Cascade(ToyNet(), BLOCKS, build_model=Wider, metric="error", out=tmp_path / "b")
    with pytest.raises(
        topdown.ConfigError,
        match=r"build_model\(\) must return a model like the plan's, with mid.0.weight \(16, 16\); "
        r"got mid.0.weight \(17, 16\)",
    ):
        next(iter(plan))

    class WithSoftmax(ToyNet):
        def __init__(self):
            super().__init__()
            self.softmax = nn.LogSoftmax(-1)

    softmax = [*BLOCKS, ("softmax", ["softmax"])]  # a parameterless top block cannot be a frozen classifier
    with pytest.raises(
        topdown.ConfigError,
        match="split 3: the classifier is only the softmax block, which owns no parameter",
    ):
        topdown.Cascade(
            WithSoftmax(),
            softmax,
            build_model=WithSoftmax,
            metric="error",
            out=tmp_path / "c",
            config={"cascade": {"splits": [3]}},
        )
    default = topdown.Cascade(
        WithSoftmax(), softmax, build_model=WithSoftmax, metric="error", out=tmp_path / "d"
    )
    assert default.splits() == [2, 1]  # the default splits leave it out
    two = [("body", ["inp", "mid", "out"]), ("softmax", ["softmax"])]  # no split has parameters on both sides
    for plan in (topdown.Cascade, topdown.LaterLayerForgetting):
        with pytest.raises(
            topdown.ConfigError,
            match=r"no split of the blocks \['body', 'softmax'\] has a parameter on both sides",
        ):
            plan(WithSoftmax(), two, build_model=WithSoftmax, metric="error", out=tmp_path / plan.__name__)


class ForgetTwice(topdown.Plan):
    """A neighbour of the cascade in a few lines: forget the upper blocks (re-initialise them)
    while every block, the lower ones from their trained weights, keeps learning."""

    procedure = "forget-twice"

    def stages(self):
        yield self.stage_zero()
        for _ in range(2):
            yield topdown.StageSpec(
                "forget",
                self.all_blocks(),
                start=self.best_index,
                reinit_blocks=("mid", "out"),
                accept="always",
            )


class BottomUpReinit(topdown.Plan):
    """Another: stage i keeps blocks 1..i as trained, frozen, and re-trains fresh blocks above them."""

    procedure = "bottom-up"

    def stages(self):
        yield self.stage_zero()
        for k in range(1, len(self.blocks)):
            yield topdown.StageSpec(
                "bottom-up", tuple(self.blocks.split(k)[1]), start=self.best_index, split=k
            )


def test_neighbours_of_the_cascade_are_plans_of_a_few_lines(tmp_path):
    torch.manual_seed(0)
    plan = ForgetTwice(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=tmp_path / "forget")
    for stage in plan:
        if stage.index > 0:  # the lower block starts from the chosen model, the upper ones afresh; all train
            chosen = topdown.files.load_tensors(
                tmp_path / "forget" / "checkpoints" / f"stage-{plan.best_index}.safetensors"
            )[0]
            state = stage.model.state_dict()
            assert all(
                torch.equal(state[k], v) == k.startswith("inp.")
                for k, v in chosen.items()
                if v.is_floating_point() and v.dim()
            )
            assert len(stage.trainable_parameters()) == len(list(stage.model.parameters()))
        my_training(stage.model, stage.trainable_parameters())
        stage.finish(val={"error": val_error(stage.model)})
    assert [(s["trained_blocks"], s.get("reinit_blocks")) for s in plan.summary["stages"]] == [
        (["inp", "mid", "out"], None),
        (["inp", "mid", "out"], ["mid", "out"]),
        (["inp", "mid", "out"], ["mid", "out"]),
    ]
    assert plan.summary["chosen_stage"] == 2 and plan.summary["procedure"] == "forget-twice"

    torch.manual_seed(0)
    plan = BottomUpReinit(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=tmp_path / "bottom-up")
    for stage in plan:
        my_training(stage.model, stage.trainable_parameters())
        stage.finish(val={"error": val_error(stage.model)})
    assert [(s["trained_blocks"], s["frozen_blocks"]) for s in plan.summary["stages"]] == [
        (["inp", "mid", "out"], []),
        (["mid", "out"], ["inp"]),
        (["out"], ["inp", "mid"]),
    ]


def test_a_stage_naming_an_unknown_block_is_refused_before_it_trains(tmp_path):
    class Misspelt(topdown.Plan):
        def stages(self):
            yield self.stage_zero()
            yield topdown.StageSpec("forget", self.all_blocks(), start=0, reinit_blocks=("outt",))

    torch.manual_seed(0)
    plan = Misspelt(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=tmp_path / "run")
    stages = iter(plan)
    next(stages).finish(val={"error": 0.5})
    with pytest.raises(topdown.BlockError, match=r"unknown block\(s\) \['outt'\]"):
        next(stages)
    assert [s["index"] for s in read_summary(tmp_path / "run")["stages"]] == [0]  # stage 0 is kept


def test_our_loop_is_one_executor_of_the_same_plan(tmp_path):
    """Driving a plan by hand with ``fit`` gives exactly the summary of ``topdown.cascade``."""
    task, train = toy_task(), TrainConfig(epochs=2, lr=0.01)
    ours = topdown.cascade(task, tmp_path / "ours", train=train, cascade=CascadeConfig(candidates=2), seed=5)
    torch.manual_seed(topdown.seeds.derive_seed(5, 0, 0))
    plan = topdown.Cascade(
        task.build_model(),
        task.blocks,
        build_model=task.build_model,
        metric="error",
        out=tmp_path / "mine",
        config=RunConfig(train=train, cascade=CascadeConfig(candidates=2)),
        seed=5,
        name="toy",
    )
    for stage in plan:
        result = fit(
            stage.model, task, stage.train, seed=stage.seed, desc=stage.describe(), on_epoch=stage.log
        )
        stage.model.eval()
        with torch.no_grad():
            test = task.evaluate(stage.model, "test")
        stage.finish(val=result.val, test=test, epochs=result.epochs, kept_epoch=result.kept_epoch)
    assert without_seconds(plan.summary) == without_seconds(ours)


KILLABLE = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import topdown
    from conftest import ToyNet
    from test_plan import BLOCKS, my_training, val_error
    torch.manual_seed(0)
    plan = topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=sys.argv[1], seed=3,
                           resume=len(sys.argv) > 2,
                           config=topdown.RunConfig(cascade=topdown.CascadeConfig(candidates=2)))
    for stage in plan:
        print(f"handed {{stage.index}}.{{stage.candidate}}", flush=True)
        torch.manual_seed(stage.seed)
        my_training(stage.model, stage.trainable_parameters())
        if os.environ.get("KILL_AT") == f"{{stage.index}}.{{stage.candidate}}":
            os.kill(os.getpid(), signal.SIGKILL)
        stage.finish(val={{"error": val_error(stage.model)}}, test={{"error": 0.0}})
""")


@pytest.mark.parametrize("kill_at", ["1.1", "2.0"])
def test_an_interrupted_plan_resumes_to_the_uninterrupted_result(tmp_path, kill_at):
    script = tmp_path / "loop.py"
    script.write_text(KILLABLE.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}

    def run(out, *extra, **e):
        return subprocess.run(
            [sys.executable, str(script), str(out), *extra], env={**env, **e}, capture_output=True, text=True
        )

    assert run(tmp_path / "whole").returncode == 0
    killed = run(tmp_path / "resumed", KILL_AT=kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert read_summary(tmp_path / "resumed")["status"] == "running"
    resumed = run(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    handed = resumed.stdout.split("\n")
    assert handed[0] == f"handed {kill_at}"  # what finished before the kill is not handed out again
    assert without_seconds(read_summary(tmp_path / "resumed")) == without_seconds(
        read_summary(tmp_path / "whole")
    )
    assert not list((tmp_path / "resumed" / "state").glob("*"))


def test_every_resume_is_recorded_even_one_killed_before_its_stage_finished(tmp_path):
    """`resumed_on` is where a run was continued (machine, threads, versions): a continuation killed
    before it finished a stage must still be on record."""
    script = tmp_path / "loop.py"
    script.write_text(KILLABLE.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}

    def run(*extra, **e):
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path / "run"), *extra],
            env={**env, **e},
            capture_output=True,
            text=True,
        )

    assert run(KILL_AT="1.1").returncode == -signal.SIGKILL
    assert run("--resume", KILL_AT="1.1").returncode == -signal.SIGKILL  # killed again, in the same stage
    assert len(read_summary(tmp_path / "run")["resumed_on"]) == 1
    assert run("--resume").returncode == 0
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "complete" and len(summary["resumed_on"]) == 2


def test_a_run_in_progress_is_refused_to_a_second_process_until_it_ends(tmp_path):
    """Two processes writing one run would interleave its records and checkpoints (a command
    started again while the first still runs): the second is refused, the first is unharmed."""
    script = tmp_path / "loop.py"
    script.write_text(KILLABLE.format(tests=str(ROOT / "tests")))

    def second():
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path / "run"), "--resume"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"},
        )

    torch.manual_seed(0)
    plan = topdown.Cascade(
        ToyNet(),
        BLOCKS,
        build_model=ToyNet,
        metric="error",
        out=tmp_path / "run",
        seed=3,
        config=RunConfig(cascade=CascadeConfig(candidates=2)),
    )
    for stage in plan:
        if stage.index == 1:
            refused = second()
            assert (
                refused.returncode != 0
                and "is in use: another process is training the run there" in refused.stderr
            )
        torch.manual_seed(stage.seed)
        my_training(stage.model, stage.trainable_parameters())
        stage.finish(val={"error": val_error(stage.model)}, test={"error": 0.0})
    assert read_summary(tmp_path / "run")["status"] == "complete"
    assert second().returncode == 0  # the first has finished: the run is free again


def test_readme_own_loop_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    summary = read_summary(tmp_path / "runs" / "my-loop")
    assert summary["status"] == "complete" and len(summary["stages"]) == 3
