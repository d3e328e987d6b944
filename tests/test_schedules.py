"""The re-initialisation schedules as plans (layerwise, knowledge-evolution, shrink-perturb) and
the resets they are made of: each stage's contract on the weights it hands out (what changes, what
stays bit-identical, masked parts included, what comes from the model's own init at the stage's
seed), the record and the stage table, options, and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import PYTHONPATH, ROOT, ToyNet, read_summary, without_seconds
from test_plan import BLOCKS, my_training, val_error

import topdown
from topdown import CascadeConfig, RunConfig, TrainConfig
from topdown.errors import ConfigError
from topdown.files import load_tensors
from topdown.report import stage_reset, stage_table
from topdown.resets import KelsSplit, Reinit, ShrinkPerturb
from topdown.schedules import KnowledgeEvolution, Layerwise, Restarts, ShrinkAndPerturb
from topdown.seeds import derive_seed
from topdown.stage import StageSpec

SEED = 3
FAST = TrainConfig(epochs=2, lr=0.01)


def built(seed: int) -> dict[str, torch.Tensor]:
    """The model's own initialisation at ``seed``: what a re-drawn tensor must equal."""
    torch.manual_seed(seed)
    return ToyNet().state_dict()


def drive(plan_class, check, config: dict | None = None, out=None) -> topdown.Plan:
    """Drive a plan with a plain loop; ``check(stage, start, fresh, handed)`` sees every stage after
    the first as it is handed out: its start weights, the fresh model at the stage's derived seed,
    and the weights handed out."""
    torch.manual_seed(0)
    plan = plan_class(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", seed=SEED, config=config, out=out)
    for stage in plan:
        if stage.index:
            start = plan.record.stage_weights(stage.index - 1)  # each round starts from the round before
            handed = {k: v.clone() for k, v in stage.model.state_dict().items()}
            check(stage, start, built(derive_seed(SEED, stage.index, 0)), handed)
            assert len(stage.trainable_parameters()) == len(list(stage.model.parameters()))  # all train
        torch.manual_seed(stage.seed)
        my_training(stage.model, stage.trainable_parameters(), epochs=1)
        stage.finish(val={"error": val_error(stage.model)})
    return plan


PARAMETERS = {n for n, _ in ToyNet().named_parameters()}


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def test_layerwise_rescales_the_blocks_below_to_their_initial_norms_and_reinitialises_those_above():
    initial = built(derive_seed(SEED, 0, 0))  # the model as stage 0 first built it
    seen = []

    def check(stage, start, fresh, handed):
        k = stage.split
        seen.append(k)
        kept = [b for b, _ in BLOCKS][:k]
        for key, tensor in handed.items():
            if not key.startswith(tuple(f"{b}." for b in kept)):
                assert torch.equal(tensor, fresh[key]), key  # re-initialised: the model's own init
            elif key in PARAMETERS:
                assert torch.equal(tensor, start[key] * (initial[key].norm() / start[key].norm())), key
                assert torch.allclose(tensor.norm(), initial[key].norm(), rtol=1e-5, atol=0), key
                # (a bias before BatchNorm gets no gradient: it keeps its initial values and norm)
                assert torch.equal(start[key].norm(), initial[key].norm()) != changed(tensor, start[key]), key
            else:  # BatchNorm statistics are carried
                assert torch.equal(tensor, start[key]), key

    plan = drive(Layerwise, check)
    assert seen == [1, 2]  # bottom-up
    assert [s["reset"] for s in plan.summary["stages"]] == [
        [],
        [
            {"kind": "rescale", "blocks": ["inp"], "norm": "initial"},
            {"kind": "reinit", "blocks": ["mid", "out"]},
        ],
        [
            {"kind": "rescale", "blocks": ["inp", "mid"], "norm": "initial"},
            {"kind": "reinit", "blocks": ["out"]},
        ],
    ]


def test_knowledge_evolution_keeps_the_fit_part_and_redraws_the_reset_part():
    # KELS at s = 0.5: the first 8 of 16 outputs x the first 8 inputs; the first layer keeps all
    # of its 8 inputs, the last all of its 3 outputs
    fit = {"inp.0.weight": (8, 8), "mid.0.weight": (8, 8), "out.weight": (3, 8)}

    def check(stage, start, fresh, handed):
        for key, tensor in handed.items():
            if key in fit:
                mask = torch.zeros_like(tensor, dtype=torch.bool)
                mask[: fit[key][0], : fit[key][1]] = True
                assert torch.equal(tensor[mask], start[key][mask]), key
                assert torch.equal(tensor[~mask], fresh[key][~mask]), key
                assert not torch.equal(tensor[~mask], start[key][~mask]), key
            else:  # biases, BatchNorm weights and statistics are kept whole
                assert torch.equal(tensor, start[key]), key

    plan = drive(KnowledgeEvolution, check)
    assert [s["reset"] for s in plan.summary["stages"][1:]] == [
        [{"kind": "kels", "blocks": ["inp", "mid", "out"], "split_rate": 0.5}]
    ] * 2


def test_shrink_and_perturb_is_exactly_lambda_theta_plus_p_fresh_with_fresh_statistics():
    def check(stage, start, fresh, handed):
        for key, tensor in handed.items():
            if key in PARAMETERS:
                assert torch.equal(tensor, 0.3 * start[key] + 0.2 * fresh[key]), key
            else:  # the source returns the fresh network: its BatchNorm statistics restart
                assert torch.equal(tensor, fresh[key]), key

    plan = drive(ShrinkAndPerturb, check, {"procedure": {"shrink": 0.3, "perturb": 0.2, "rounds": 3}})
    assert [s["reset"] for s in plan.summary["stages"][1:]] == [
        [{"kind": "shrink-perturb", "blocks": ["inp", "mid", "out"], "shrink": 0.3, "perturb": 0.2}]
    ] * 3


def test_restarts_hand_out_the_round_before_bit_identical():
    """The control: nothing reset, every block trained, each round from the last round's weights."""

    def check(stage, start, fresh, handed):
        assert handed.keys() == start.keys() and all(torch.equal(handed[k], start[k]) for k in start)

    plan = drive(Restarts, check)
    assert len(plan.summary["stages"]) == 3 and all(s["reset"] == [] for s in plan.summary["stages"][1:])
    assert [stage_reset(s) for s in plan.summary["stages"]] == ["new model", "-", "-"]


def test_the_schedules_run_as_procedures_with_the_cascades_budget_and_say_what_they_did(tmp_path, task):
    cascade = topdown.cascade(task, tmp_path / "cascade", train=FAST, seed=0)
    budget = sum(s["epochs"] for s in cascade["stages"])
    defaults = {
        "layerwise": {"kind": "reinit", "blocks": ["mid", "out"]},
        "knowledge-evolution": {"kind": "kels", "blocks": ["inp", "mid", "out"], "split_rate": 0.5},
        "shrink-perturb": {
            "kind": "shrink-perturb",
            "blocks": ["inp", "mid", "out"],
            "shrink": 0.4,
            "perturb": 0.1,
        },
    }
    defaults["restarts"] = None  # nothing reset
    for name, first_reset in defaults.items():
        summary = topdown.run_procedure(name, task, tmp_path / name, config=RunConfig(train=FAST), seed=0)
        stages = summary["stages"]
        assert summary["procedure"] == name and len(stages) == len(cascade["stages"])
        assert sum(s["epochs"] for s in stages) == budget and stages[0]["val"] == cascade["stages"][0]["val"]
        assert first_reset in stages[1]["reset"] if first_reset else stages[1]["reset"] == []
        chosen = summary["chosen_stage"]  # validation chooses among the rounds; the last is recorded too
        assert all(stages[chosen]["val"]["error"] <= s["val"]["error"] for s in stages)
        assert (tmp_path / name / "checkpoints" / f"stage-{len(stages) - 1}.safetensors").is_file()
        report = (tmp_path / name / "report.md").read_text()
        assert "| reset | trained blocks | frozen blocks |" in report
        assert stage_reset(stages[1]) in report
    report = (tmp_path / "layerwise" / "report.md").read_text()
    assert "| rescaled to initial norms: inp; re-initialised: mid, out | inp, mid, out | - |" in report
    ke = read_summary(tmp_path / "knowledge-evolution")  # the slim model, beside every generation
    assert all(set(s["reported"]) == {"slim"} for s in ke["stages"])
    assert all(set(s["reported"]["slim"]) == {"val", "test"} for s in ke["stages"])
    assert all("reported" not in s for s in read_summary(tmp_path / "shrink-perturb")["stages"])
    report = (tmp_path / "knowledge-evolution" / "report.md").read_text()
    assert "Reported beside the stages (never used to choose):" in report
    assert "- stage 1, slim: val " in report


def test_the_slim_model_computes_what_the_fit_part_alone_computes_in_a_narrow_network():
    """KELS at s = 0.5 over linear layers joined by BatchNorm and ReLU: the masked copy and a network
    of half the width holding the fit parts give the same outputs; the model itself is untouched."""

    def net(width: int) -> torch.nn.Sequential:
        return torch.nn.Sequential(
            torch.nn.Linear(8, width),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 3),
        )

    torch.manual_seed(0)
    wide, narrow = net(6), net(3)
    with torch.no_grad():
        for module in wide:
            if isinstance(module, torch.nn.BatchNorm1d):  # statistics and affine weights of a trained model
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
                module.weight.normal_()
                module.bias.normal_()
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    blocks = topdown.Blocks(wide, {"a": ["0", "1"], "b": ["3", "4"], "c": ["6"]})
    split = KelsSplit(blocks.names, 0.5)
    slim = split.slim(wide, blocks).eval()
    fit = split.fit_parts(wide, blocks)
    with torch.no_grad():
        for name, tensor in narrow.state_dict().items():
            source = wide.state_dict()[name]
            index = fit.get(name, tuple(slice(0, n) for n in tensor.shape))
            tensor.copy_(source[index] if source.dim() else source)
    x = torch.randn(16, 8)
    assert torch.allclose(slim(x), narrow.eval()(x), atol=1e-6)
    assert not torch.allclose(slim(x), wide.eval()(x), atol=1e-3)  # the reset part did matter
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())


def test_a_schedules_options_are_checked_before_it_trains(tmp_path, task):
    def run(name, procedure):
        config = {"train": {"epochs": 2, "lr": 0.01}, "procedure": procedure}
        return topdown.run_procedure(name, task, tmp_path / "x", config=config)

    with pytest.raises(ConfigError, match=r"split_rate.*< 1"):
        run("knowledge-evolution", {"split_rate": 1.0})
    with pytest.raises(ConfigError, match="knowledge-evolution does not use procedure.shrink"):
        run("knowledge-evolution", {"shrink": 0.5})
    with pytest.raises(ConfigError, match="layerwise does not use procedure.rounds"):
        run("layerwise", {"rounds": 2})
    with pytest.raises(ConfigError, match=r"perturb.*>= 0"):
        run("shrink-perturb", {"perturb": -0.1})
    assert not (tmp_path / "x").exists()


def test_a_reset_is_given_where_it_can_work_or_refused_in_one_line():
    with pytest.raises(ConfigError, match="start=INDEX"):
        StageSpec("x", ("inp",), reset=Reinit(("inp",)))
    with pytest.raises(ConfigError, match="replaces reinit and reinit_blocks"):
        StageSpec("x", ("inp",), start=0, reset=Reinit(("inp",)), reinit_blocks=("out",))
    with pytest.raises(ConfigError, match="a stage's reset is a Reset"):
        StageSpec("x", ("inp",), start=0, reset=[Reinit(("inp",)), "out"])
    with pytest.raises(ConfigError, match=r"split rate must be a number in \(0, 1\)"):
        KelsSplit(("inp",), split_rate=1.0)
    with pytest.raises(ConfigError, match="non-empty sequence"):
        ShrinkPerturb("inp")
    # reinit / reinit_blocks stay: they are the re-initialisation of the trained, or the named, blocks
    assert StageSpec("x", ("inp",), start=0).resets() == (Reinit(("inp",)),)
    assert StageSpec("x", ("inp",), start=0, reinit_blocks=("out",)).resets() == (Reinit(("out",)),)
    assert StageSpec("x", ("inp",), start=0, reinit=False).resets() == StageSpec("x", ("inp",)).resets() == ()


def test_a_plan_of_ones_own_combines_resets_and_a_misspelt_block_is_refused(tmp_path):
    class Mixed(topdown.Plan):
        def stages(self):
            yield self.stage_zero()
            yield StageSpec(
                "mixed", ("mid", "out"), start=0, reset=(ShrinkPerturb(("inp",), 1.0, 0.0), Reinit(("mid",)))
            )
            yield StageSpec("typo", self.all_blocks(), start=1, reset=Reinit(("midd",)))

    torch.manual_seed(0)
    plan = Mixed(ToyNet(), BLOCKS, build_model=ToyNet, metric="error")
    stages = iter(plan)
    next(stages).finish(val={"error": 0.5})
    stage = next(stages)
    start, fresh, handed = plan.record.stage_weights(0), built(stage.seed), stage.model.state_dict()
    assert all(torch.equal(handed[k], start[k]) for k in ("inp.0.weight", "out.weight", "out.bias"))
    assert torch.equal(handed["inp.1.running_mean"], fresh["inp.1.running_mean"])  # statistics restart
    assert torch.equal(handed["mid.0.weight"], fresh["mid.0.weight"])
    assert stage.frozen_blocks == ["inp"]
    stage.finish(val={"error": 0.4})
    with pytest.raises(topdown.BlockError, match=r"unknown block\(s\) \['midd'\]"):
        next(stages)


def test_the_stage_table_reads_runs_recorded_before_resets_were_recorded():
    torch.manual_seed(0)
    config = RunConfig(cascade=CascadeConfig(finetune_epochs=1))
    plan = topdown.Cascade(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", config=config)
    for stage in plan:
        stage.finish(val={"error": 0.5 - 0.1 * stage.index})
    summary = plan.summary
    cells = [stage_reset(s) for s in summary["stages"]]
    assert cells == ["new model", "re-initialised: inp, mid", "re-initialised: inp", "-"]
    assert [s["reset"] for s in summary["stages"]] == [
        [],
        [{"kind": "reinit", "blocks": ["inp", "mid"]}],
        [{"kind": "reinit", "blocks": ["inp"]}],
        [],
    ]
    older = {**summary, "stages": [{k: v for k, v in s.items() if k != "reset"} for s in summary["stages"]]}
    assert [stage_reset(s) for s in older["stages"]] == ["re-initialised: inp, mid, out", *cells[1:]]
    rows = stage_table(older).splitlines()[2:]
    assert rows[1].startswith("| 1 | cascade | 2 | re-initialised: inp, mid | inp, mid | out | ")
    assert rows[3].startswith("| 3 (chosen) | finetune | - | - | inp, mid, out | - | ")


KILLABLE = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import ToyNet
    from test_plan import BLOCKS, my_training, val_error
    from topdown import schedules
    torch.manual_seed(0)
    plan_class = getattr(schedules, sys.argv[2])
    plan = plan_class(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", out=sys.argv[1], seed=3,
                      resume=len(sys.argv) > 3)
    for stage in plan:
        print(f"handed {{stage.index}}", flush=True)
        torch.manual_seed(stage.seed)
        my_training(stage.model, stage.trainable_parameters(), epochs=1)
        if os.environ.get("KILL_AT") == str(stage.index):
            os.kill(os.getpid(), signal.SIGKILL)
        stage.finish(val={{"error": val_error(stage.model)}}, test={{"error": 0.0}})
""")


@pytest.mark.parametrize("plan", ["Layerwise", "KnowledgeEvolution", "ShrinkAndPerturb", "Restarts"])
def test_a_schedule_killed_mid_plan_resumes_to_the_uninterrupted_result(tmp_path, plan):
    script = tmp_path / "loop.py"
    script.write_text(KILLABLE.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}

    def run(out, *extra, **e):
        return subprocess.run(
            [sys.executable, str(script), str(out), plan, *extra],
            env={**env, **e},
            capture_output=True,
            text=True,
        )

    assert run(tmp_path / "whole").returncode == 0
    assert run(tmp_path / "resumed", KILL_AT="2").returncode == -signal.SIGKILL
    resumed = run(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split("\n")[0] == "handed 2"  # stages 0 and 1 are not trained again
    whole, again = read_summary(tmp_path / "whole"), read_summary(tmp_path / "resumed")
    assert without_seconds(again) == without_seconds(whole) and again["status"] == "complete"
    last = f"checkpoints/stage-{len(whole['stages']) - 1}.safetensors"
    ours, theirs = (load_tensors(tmp_path / run / last)[0] for run in ("whole", "resumed"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
