"""Blocks: partition checks, freezing (no gradients, eval-mode normalisation), re-initialisation."""

import pytest
import torch
from conftest import ToyNet, toy_task
from torch import nn

import topdown.loop as loop
from topdown import BlockError, Blocks, TrainConfig
from topdown.loop import fit


def test_unknown_module_is_an_error():
    with pytest.raises(BlockError, match="no module named 'nope'"):
        Blocks(ToyNet(), ["inp", "mid", "nope"])


def test_parameter_covered_by_no_block_is_an_error():
    with pytest.raises(BlockError, match="out.weight' is covered by no block"):
        Blocks(ToyNet(), ["inp", "mid"])


def test_parameter_covered_by_two_blocks_is_an_error():
    with pytest.raises(BlockError, match="covered by two blocks"):
        Blocks(ToyNet(), [("a", ["inp", "mid"]), ("b", ["mid.0"]), ("c", ["out"])])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 10, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, x):
        return self.decoder(self.body(self.embed(x)))


def test_shared_parameter_needs_an_owner():
    with pytest.raises(BlockError, match="shared by blocks .*say which block owns it"):
        Blocks(Tied(), ["embed", "body", "decoder"])
    blocks = Blocks(Tied(), ["embed", "body", "decoder"], shared={"decoder.weight": "decoder"})
    assert blocks.parameter_names() == {
        "embed": [],
        "body": ["body.weight", "body.bias"],
        "decoder": ["embed.weight"],
    }
    with pytest.raises(BlockError, match="unknown block"):
        Blocks(Tied(), ["embed", "body", "decoder"], shared={"decoder.weight": "nope"})


def test_split_ranges():
    blocks = Blocks(ToyNet(), ["inp", "mid", "out"])
    assert blocks.split(1) == (["inp"], ["mid", "out"])
    assert blocks.split(2) == (["inp", "mid"], ["out"])
    for bad in (0, 3):
        with pytest.raises(BlockError, match="out of range"):
            blocks.split(bad)


def test_frozen_blocks_are_bit_identical_get_no_grad_and_stay_out_of_the_optimizer(monkeypatch):
    task = toy_task()
    torch.manual_seed(0)
    model = task.build_model()
    blocks = Blocks(model, task.blocks)
    # Non-trivial BatchNorm statistics first, so that "unchanged" means something.
    fit(model, task, TrainConfig(epochs=1), seed=1)
    blocks.freeze(["mid", "out"])
    frozen_keys = blocks.state_keys(["mid", "out"])
    assert "mid.1.running_mean" in frozen_keys and "mid.1.num_batches_tracked" in frozen_keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda params, cfg: seen.setdefault("opt", real(params, cfg)))
    fit(model, task, TrainConfig(epochs=2, lr=0.05), seed=2)
    after = model.state_dict()
    for key in frozen_keys:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["inp.0.weight"], after["inp.0.weight"])
    assert not torch.equal(before["inp.1.running_mean"], after["inp.1.running_mean"])
    for name, p in model.named_parameters():
        if name.startswith(("mid.", "out.")):
            assert p.grad is None and not p.requires_grad, name
    in_optimizer = {id(p) for group in seen["opt"].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.inp.parameters()}


def test_frozen_modules_stay_in_eval_mode_across_model_train():
    model = ToyNet()
    blocks = Blocks(model, ["inp", "mid", "out"])
    blocks.freeze(["mid"])
    model.train()
    assert model.inp.training and model.out.training
    assert not any(m.training for m in model.mid.modules())
    blocks.freeze(["mid"], frozen_dropout=True)
    model.train()
    assert not model.mid[1].training  # BatchNorm pinned
    assert model.mid[3].training  # dropout left active on request
    blocks.unfreeze()
    model.train()
    assert all(m.training for m in model.modules())


def test_copy_blocks_reinitialises_only_the_named_blocks():
    torch.manual_seed(0)
    model = ToyNet()
    blocks = Blocks(model, ["inp", "mid", "out"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    fresh = ToyNet()
    blocks.copy_blocks(fresh, ["inp", "mid"])
    after = model.state_dict()
    for key in before:
        if key.startswith("out."):
            assert torch.equal(after[key], before[key])
        else:
            assert torch.equal(after[key], fresh.state_dict()[key])
    assert not torch.equal(after["inp.0.weight"], before["inp.0.weight"])


def test_copy_blocks_keeps_a_shared_parameter_with_its_owner():
    torch.manual_seed(0)
    model = Tied()
    blocks = Blocks(model, ["embed", "body", "decoder"], shared={"embed.weight": "decoder"})
    tied_before = model.embed.weight.detach().clone()
    body_before = {k: v.clone() for k, v in model.body.state_dict().items()}
    source = Tied()
    blocks.copy_blocks(source, ["embed", "body"])
    assert torch.equal(model.embed.weight, tied_before)
    for key, value in model.body.state_dict().items():  # the other named block was copied
        assert torch.equal(value, source.body.state_dict()[key]) and not torch.equal(
            value, body_before[key]
        ), key


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_blocks_declared_output_to_input_are_refused_on_the_first_forward_pass(tmp_path):
    """The declaration partitions the parameters either way; the forward pass shows the order."""
    import topdown

    torch.manual_seed(0)
    plan = topdown.Cascade(
        ToyNet(), ["out", "mid", "inp"], build_model=ToyNet, metric="error", out=tmp_path / "run"
    )
    stage = next(iter(plan))
    with pytest.raises(BlockError, match="declared output to input.*out, mid, inp|order inp, mid, out"):
        stage.model(torch.randn(4, 8))


def test_blocks_in_order_are_judged_once_and_leave_no_hook_behind(capsys):
    model = ToyNet()
    blocks = Blocks(model, ["inp", "mid", "out"])
    before = _forward_hooks(model)
    blocks.watch_call_order()
    assert _forward_hooks(model) > before
    model(torch.randn(4, 8))
    assert _forward_hooks(model) == before
    assert capsys.readouterr().err == ""


class EarlyHead(nn.Module):
    """A shared output layer applied to an intermediate layer too (as intermediate CTC does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        middle = self.b(self.a(x))
        return self.head(middle) + self.head(self.c(middle))


def test_another_order_than_declared_is_a_warning_not_an_error(capsys):
    model = EarlyHead()
    Blocks(model, ["a", "b", "c", "head"]).watch_call_order()
    model(torch.randn(2, 4))  # head runs before c
    assert (
        "runs the blocks in the order a, b, head, c, not as declared (a, b, c, head)"
        in capsys.readouterr().err
    )
    model(torch.randn(2, 4))
    assert capsys.readouterr().err == ""  # said once
