"""What a stage holds beyond its model: the weights it hands out are exactly those a full fresh
build gives, a finished stage leaves one copy of its weights (in its record) and no other, and the
loop's kept epochs are copies on the host, at most ``train.average_best`` of them at any time.
Memory is counted as bench/stage_memory.py counts it (live tensor bytes from PyTorch's allocator
events), on small models."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT, ToyNet
from test_plan import BLOCKS, my_training, val_error

import topdown
from topdown.best_epochs import Ranking, keep_epoch
from topdown.blocks import Blocks
from topdown.devices import host_copy
from topdown.files import load_tensors, save_tensors
from topdown.metrics import Metric
from topdown.resets import ResetContext
from topdown.schedules import KnowledgeEvolution, Layerwise, ShrinkAndPerturb
from topdown.seeds import derive_seed

sys.path.insert(0, str(ROOT / "bench"))
import stage_memory  # noqa: E402

SEED = 3
WIDTH, DEPTH = 64, 3  # an MLP of 0.3 MB


def size_of(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def fresh(seed: int) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet()


@pytest.mark.parametrize(
    "plan_class, config",
    [
        (topdown.Cascade, {"cascade": {"splits": [1]}}),
        (topdown.Forgetting, {"procedure": {"rounds": 1}}),
        (Layerwise, {"cascade": {"splits": [1]}}),
        (KnowledgeEvolution, {"procedure": {"rounds": 1}}),
        (ShrinkAndPerturb, {"procedure": {"rounds": 1}}),
    ],
)
def test_every_plan_hands_out_bit_for_bit_what_its_resets_give_over_a_full_fresh_build(plan_class, config):
    """The stage's resets applied by hand to its start weights, with a whole model built at the
    stage's derived seed (and the model as first built), give exactly the weights handed out."""
    torch.manual_seed(0)
    plan = plan_class(ToyNet(), BLOCKS, build_model=ToyNet, metric="error", seed=SEED, config=config)
    for stage in plan:
        if stage.index:
            model = ToyNet()
            model.load_state_dict(plan.record.stage_weights(stage.spec.start))
            built, initial = fresh(derive_seed(SEED, stage.index, 0)), fresh(derive_seed(SEED, 0, 0))
            for reset in stage.spec.resets():
                reset.apply(ResetContext(model, Blocks(model, BLOCKS), built, initial))
            handed, expected = stage.model.state_dict(), model.state_dict()
            assert handed.keys() == expected.keys() and stage.spec.resets()
            for key, tensor in handed.items():
                assert torch.equal(tensor, expected[key]), key
        my_training(stage.model, stage.trainable_parameters(), epochs=1)
        stage.finish(val={"error": val_error(stage.model)})
    assert len(plan.summary["stages"]) == 2


def stage_one(window, candidates: int = 1) -> None:
    """A cascade over the bench's MLP, in memory: stage 0 finished untrained, then stage 1's last
    candidate finished inside ``window``."""
    torch.manual_seed(0)
    plan = topdown.Cascade(
        stage_memory.build(WIDTH, DEPTH),
        stage_memory.block_spec(DEPTH),
        build_model=lambda: stage_memory.build(WIDTH, DEPTH),
        metric="error",
        config={"cascade": {"splits": [DEPTH], "candidates": candidates}},
    )
    stages = iter(plan)
    next(stages).finish(val={"error": 1.0})
    for c in range(candidates):
        stage = next(stages)
        if c < candidates - 1:
            stage.finish(val={"error": 0.5})
    with window():
        stage.finish(val={"error": 0.6})


@pytest.mark.parametrize("candidates", [1, 2])
def test_a_finished_stage_leaves_one_copy_of_its_weights_in_its_record_and_no_other(candidates):
    """The last candidate's weights are recorded from the model itself (the in-memory record keeps
    its own copy), and the plan keeps none once the stage is recorded: an earlier candidate's copy,
    loaded back as the better one, is let go too."""
    size = size_of(stage_memory.build(WIDTH, DEPTH))
    span = stage_memory.measure(lambda window: stage_one(window, candidates), "cpu")
    assert span.peak - span.start == size  # the record's copy, made once
    assert span.end - span.start == size - (candidates - 1) * size  # an earlier candidate's copy freed


def test_host_copy_is_on_the_cpu_and_shares_nothing_with_the_model():
    model = ToyNet()
    copy = host_copy(model)
    for key, tensor in model.state_dict().items():
        assert copy[key].device.type == "cpu" and torch.equal(copy[key], tensor)
        assert copy[key].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()


def test_the_loop_holds_at_most_average_best_copies_of_the_weights_even_while_replacing_one():
    """A better epoch displaces the worst kept one, which is let go before the new copy is made."""
    model = stage_memory.build(WIDTH, DEPTH)
    ranking, n = Ranking(Metric.named("error")), 2
    kept: list = []

    def work(window):
        keep_epoch(kept, {"error": 0.5}, 1, model, ranking, n)
        keep_epoch(kept, {"error": 0.4}, 2, model, ranking, n)
        with window():
            keep_epoch(kept, {"error": 0.3}, 3, model, ranking, n)

    span = stage_memory.measure(work, "cpu")
    assert [(v["error"], e) for v, e, _ in kept] == [(0.3, 3), (0.4, 2)]
    assert span.peak == span.start and span.end == span.start  # one copy out, one in


def test_a_checkpoint_is_saved_without_a_copy_of_the_model_and_tied_weights_still_save(tmp_path):
    """Only a tensor whose memory another one holds (a tied weight) is copied to be saved."""
    state = stage_memory.build(WIDTH, DEPTH).state_dict()
    state["tied.weight"] = state["0.0.weight"]
    path = tmp_path / "model.safetensors"

    def work(window):
        with window():
            save_tensors(path, state)

    span = stage_memory.measure(work, "cpu")
    assert span.peak - span.start == state["tied.weight"].numel() * state["tied.weight"].element_size()
    loaded = load_tensors(path)[0]
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
