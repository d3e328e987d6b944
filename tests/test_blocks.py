"""Blocks: partition checks, freezing (no gradients, eval-mode normalisation), re-initialisation;
blocks that name a parameter directly."""

import pytest
import torch
from conftest import ToyNet, read_summary, toy_task
from test_plan import my_training, val_error
from torch import nn

import topdown
import topdown.loop as loop
from topdown import BlockError, Blocks, TrainConfig
from topdown.blocks import entry_parameters
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


# -- a parameter as a block entry ------------------------------------------------------------


class OnContainer(ToyNet):
    """ToyNet with two parameters of the top-level model itself, which no submodule holds."""

    def __init__(self):
        super().__init__()
        self.input_gain = nn.Parameter(1 + 0.1 * torch.randn(8))
        self.logit_bias = nn.Parameter(0.1 * torch.randn(3))

    def forward(self, x):
        return super().forward(x * self.input_gain) + self.logit_bias


ON_CONTAINER = [("inp", ["input_gain", "inp"]), ("mid", ["mid"]), ("out", ["out", "logit_bias"])]
# The parameter alone as a block, to see that freezing and copying it touch nothing else.
OWN_BLOCK = [("gain", ["input_gain"]), ("inp", ["inp"]), ("mid", ["mid"]), ("out", ["out", "logit_bias"])]


def test_a_parameter_on_a_container_is_named_as_a_block_entry():
    model = OnContainer()
    with pytest.raises(BlockError, match="parameter 'input_gain' is covered by no block"):
        Blocks(model, ["inp", "mid", ("out", ["out", "logit_bias"])])
    owned = Blocks(model, ON_CONTAINER).parameter_names()
    assert sorted(n for names in owned.values() for n in names) == sorted(
        n for n, _ in model.named_parameters()
    )
    assert "input_gain" in owned["inp"] and "logit_bias" in owned["out"]
    assert Blocks(model, OWN_BLOCK).parameter_names()["gain"] == ["input_gain"]
    assert entry_parameters(model, "input_gain") == [model.input_gain]
    assert entry_parameters(model, "out") == [model.out.weight, model.out.bias]


def test_a_module_name_keeps_meaning_the_module_and_a_parameter_name_the_parameter():
    """ "out" is the module (and begins "out.weight"); "out.weight" alone leaves "out.bias" uncovered."""
    model = ToyNet()
    assert Blocks(model, ["inp", "mid", "out"]).parameter_names()["out"] == ["out.weight", "out.bias"]
    with pytest.raises(BlockError, match="parameter 'out.bias' is covered by no block"):
        Blocks(model, ["inp", "mid", ("out", ["out.weight"])])
    by_parameter = Blocks(model, ["inp", "mid", ("out", ["out.weight", "out.bias"])])
    assert by_parameter.parameter_names()["out"] == ["out.weight", "out.bias"]
    by_parameter.freeze(["out"])  # no module named, none pinned to eval mode
    model.train()
    assert model.out.training and not model.out.weight.requires_grad


def test_a_name_that_is_neither_a_module_nor_a_parameter_is_one_clear_error():
    for entry, close in (("input_gian", "input_gain"), ("mid.0.weigth", "mid.0.weight, ")):
        with pytest.raises(BlockError) as e:
            Blocks(OnContainer(), [("inp", [entry, "inp"]), "mid", ("out", ["out", "logit_bias"])])
        assert str(e.value).startswith(
            f"block 'inp': no module named {entry!r} in the model, and no parameter either; "
            f"close names: {close}"
        )
    with pytest.raises(BlockError, match="'mid.1.running_mean' in the model, and no parameter either"):
        Blocks(OnContainer(), [*ON_CONTAINER, ("stats", ["mid.1.running_mean"])])  # a buffer is no entry


def test_a_parameter_named_by_two_blocks_needs_an_owner():
    with pytest.raises(BlockError, match="'input_gain' is covered by two blocks: \\['gain', 'inp'\\]"):
        Blocks(OnContainer(), [("gain", ["input_gain"]), ("inp", ["inp", "input_gain"]), *ON_CONTAINER[1:]])
    with pytest.raises(BlockError, match="'out.weight' is covered by two blocks"):
        Blocks(ToyNet(), ["inp", ("mid", ["mid", "out.weight"]), "out"])  # by its module and by its name
    # A tied parameter named by one of its names is reached by two blocks like a tied module's.
    spec = ["embed", "body", ("decoder", ["decoder.weight"])]
    with pytest.raises(BlockError, match="shared by blocks .*say which block owns it"):
        Blocks(Tied(), spec)
    assert Blocks(Tied(), spec, shared={"embed.weight": "decoder"}).parameter_names()["decoder"] == [
        "embed.weight"
    ]


def test_freezing_and_copying_a_parameter_entry_touch_that_parameter_only():
    torch.manual_seed(0)
    model = OnContainer()
    blocks = Blocks(model, OWN_BLOCK)
    blocks.freeze(["gain"])
    model.train()
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["input_gain"]
    assert all(m.training for m in model.modules())  # no module to pin; the container follows train()
    blocks.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    assert blocks.state_keys(["gain"]) == ["input_gain"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = OnContainer()
    blocks.copy_blocks(fresh, ["gain"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.input_gain if key == "input_gain" else before[key]), key
    assert not torch.equal(model.input_gain, before["input_gain"])


def test_a_block_of_parameter_entries_takes_no_part_in_the_order_check(capsys):
    model = OnContainer()
    blocks = Blocks(model, OWN_BLOCK)
    before = _forward_hooks(model)
    blocks.watch_call_order()
    model(torch.randn(4, 8))
    assert _forward_hooks(model) == before and capsys.readouterr().err == ""
    reversed_blocks = Blocks(model, OWN_BLOCK[:1] + OWN_BLOCK[:0:-1])  # gain first, the modules reversed
    reversed_blocks.watch_call_order()
    with pytest.raises(BlockError, match="declared output to input"):
        model(torch.randn(4, 8))


def test_a_cascade_keeps_a_frozen_parameter_entry_bit_identical(tmp_path):
    torch.manual_seed(0)
    plan = topdown.Cascade(OnContainer(), ON_CONTAINER, build_model=OnContainer, metric="error", out=tmp_path)
    frozen_in = []
    for stage in plan:
        model = stage.model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        my_training(model, stage.trainable_parameters(), epochs=1)
        frozen = "out" in stage.frozen_blocks
        assert torch.equal(model.logit_bias, before["logit_bias"]) == frozen
        assert model.logit_bias.requires_grad != frozen and (model.logit_bias.grad is None) == frozen
        assert not torch.equal(model.input_gain, before["input_gain"])  # in "inp", always trained
        frozen_in.append(frozen)
        stage.finish(val={"error": val_error(model)})
    assert frozen_in == [False, True, True]
    assert "logit_bias" in read_summary(tmp_path)["blocks"]["out"]


def test_a_stock_wav2vec2_for_ctc_names_its_masked_spec_embed_as_a_block_entry(capsys):
    """The parameter sits on the ``Wav2Vec2Model`` container, not in any of its submodules."""
    from test_hub_models import tiny_wav2vec2  # the hf extra, installed in CI

    torch.manual_seed(0)
    model = tiny_wav2vec2()
    modules_only = [
        ("features", ["wav2vec2.feature_extractor"]),
        ("encoder", ["wav2vec2.feature_projection", "wav2vec2.encoder"]),
        ("head", ["lm_head"]),
    ]
    with pytest.raises(BlockError, match="'wav2vec2.masked_spec_embed' is covered by no block"):
        Blocks(model, modules_only)
    spec = [("features", ["wav2vec2.feature_extractor", "wav2vec2.masked_spec_embed"]), *modules_only[1:]]
    blocks = Blocks(model, spec)
    assert "wav2vec2.masked_spec_embed" in blocks.parameter_names()["features"]
    blocks.watch_call_order()
    blocks.freeze(["features"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not model.wav2vec2.masked_spec_embed for p in trainable)
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()  # time masking on: masked_spec_embed is used
    audio, labels = torch.randn(2, 400), torch.randint(1, 8, (2, 5))
    model(audio, labels=labels).loss.backward()
    opt.step()
    assert capsys.readouterr().err == ""  # the order check passed
    after = model.state_dict()
    for key in blocks.state_keys(["features"]):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    fresh = tiny_wav2vec2()
    blocks.copy_blocks(fresh, ["features"])
    assert torch.equal(model.wav2vec2.masked_spec_embed, fresh.wav2vec2.masked_spec_embed)
