"""lm-awd: corpora, the AWD-LSTM's ingredients, tied weights across splits, NT-ASGD, a tiny cascade."""

import math

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file
from torch import nn

from topdown import Task
from topdown.blocks import Blocks
from topdown.config import TrainConfig
from topdown.errors import BlockError, ConfigError, DataError
from topdown.loop import fit
from topdown.procedures import run_procedure
from topdown.tasks import resolve_config
from topdown.tasks.lm import awd, corpus
from topdown.tasks.lm.model import AWDLSTM, LSTMLayer


def tiny_cfg(**model):
    cfg = resolve_config("lm-awd", "tiny", {"model": model} if model else {})
    return cfg


def write_corpus(root, names, texts):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, texts):
        (root / name).write_text(text)
    return root


# -- corpora ----------------------------------------------------------------------------------


def test_wt2_small_is_the_documented_split():
    lines = corpus.load_wt2_small()
    tokens = {k: sum(len(line.split()) + 1 for line in v) for k, v in lines.items()}
    assert tokens == {"train": 217646, "val": 123450, "test": 122119}
    assert lines["test"][0] == " = No. 20 Squadron RAAF = "
    assert lines["val"][1] == " = Robert <unk> = "


@pytest.mark.parametrize(
    "layout",
    [("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), ("train.txt", "valid.txt", "test.txt")],
)
def test_standard_layouts_and_unk(tmp_path, layout):
    root = write_corpus(
        tmp_path / "c", layout, [" the cat <unk> sat \n\n a dog \n", " the dog sat \n", " a zebra sat \n"]
    )
    lines = corpus.load_standard(corpus.standard_paths(root))
    vocab = corpus.build_vocab(lines["train"])
    assert vocab == ["the", "cat", "<unk>", "sat", "<eos>", "a", "dog"]  # first appearance, <eos> per line
    ids = corpus.encode(lines["test"], vocab, "test")
    assert [vocab[i] for i in ids.tolist()] == ["a", "<unk>", "sat", "<eos>"]  # zebra is unseen


def test_a_leading_byte_order_mark_is_not_a_word(tmp_path):
    """A UTF-8 BOM made '\\ufeffthe' (or '\\ufeff') a vocabulary word."""
    texts = ["the cat sat\n a dog\n", "the dog\n", "a cat\n"]
    plain = corpus.load_standard(
        corpus.standard_paths(write_corpus(tmp_path / "plain", ("train.txt", "valid.txt", "test.txt"), texts))
    )
    root = tmp_path / "bom"
    root.mkdir()
    for name, text in zip(
        ("train.txt", "valid.txt", "test.txt"),
        ["\ufeff" + texts[0], "\ufeff" + texts[1], "\ufeff \n" + texts[2]],
    ):
        (root / name).write_bytes(text.encode("utf-8"))
    bom = corpus.load_standard(corpus.standard_paths(root))
    assert (
        corpus.build_vocab(bom["train"])
        == corpus.build_vocab(plain["train"])
        == ["the", "cat", "sat", "<eos>", "a", "dog"]
    )
    assert bom["val"] == plain["val"] and bom["test"][1:] == plain["test"]


def test_unseen_word_without_unk_and_empty_corpus_are_data_errors(tmp_path):
    root = write_corpus(
        tmp_path / "c", ("train.txt", "valid.txt", "test.txt"), ["the cat\n", "the cat\n", "the zebra\n"]
    )
    vocab = corpus.build_vocab(corpus.load_standard(corpus.standard_paths(root))["train"])
    with pytest.raises(
        DataError, match=r"test split, line 1: word 'zebra' is not in the training vocabulary"
    ):
        corpus.encode(["the zebra"], vocab, "test")
    with pytest.raises(DataError, match="empty"):
        corpus.encode(["", "  "], vocab, "val")
    with pytest.raises(DataError, match="missing test.txt"):
        corpus.load_standard(
            corpus.standard_paths(write_corpus(tmp_path / "d", ("train.txt", "valid.txt"), ["a\n", "a\n"]))
        )


def test_cli_reports_bad_corpora_in_one_line(tmp_path):
    root = write_corpus(
        tmp_path / "c",
        ("train.txt", "valid.txt", "test.txt"),
        ["the cat\n" * 50, "the cat\n" * 50, "the zebra\n"],
    )
    proc = cli(
        "baseline", "lm-awd", "--preset", "tiny", "--data-dir", str(root), "--out", str(tmp_path / "r")
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"topdown: error: the test split ({root / 'test.txt'}), line 1: word 'zebra'")
    )
    empty = write_corpus(tmp_path / "e", ("train.txt", "valid.txt", "test.txt"), ["\n", "a\n", "a\n"])
    proc = cli(
        "baseline", "lm-awd", "--preset", "tiny", "--data-dir", str(empty), "--out", str(tmp_path / "r2")
    )
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"topdown: error: the train split ({empty / 'train.txt'}) is empty (no words)"
    )


def test_an_empty_split_names_its_file(tmp_path):
    root = write_corpus(
        tmp_path / "c",
        ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
        ["a b\n" * 20, " \n\n", "a\n"],
    )
    with pytest.raises(DataError) as e:
        awd.make(tiny_cfg().task, str(root))
    assert str(e.value) == f"the val split ({root / 'wiki.valid.tokens'}) is empty (no words)"


LONG = "a b c\n" * 5  # 20 tokens with <eos>: enough for the tiny preset's batch sizes of 4


@pytest.mark.parametrize(
    "texts, limit, message",
    [
        # a user's case: "4 tokens are too few for batch size 4" named no split, file or option
        (
            (LONG, "a b c\n", LONG),
            0,
            "the val split ({root}/valid.txt) has 4 tokens, too few for data.eval_batch_size 4 "
            "(at least 8: 2 per stream); lower data.eval_batch_size",
        ),
        (
            ("a b c d e\n", LONG, LONG),
            0,
            "the train split ({root}/train.txt) has 6 tokens, too few for data.batch_size 4 "
            "(at least 8: 2 per stream); lower data.batch_size",
        ),
        (
            (LONG, LONG, LONG),
            6,
            "the train split ({root}/train.txt) has 6 tokens, too few for data.batch_size 4 "
            "(at least 8: 2 per stream); lower data.batch_size, or raise data.limit_tokens (6)",
        ),
    ],
)
def test_a_split_too_short_for_its_batch_size_names_the_split_file_and_options(
    tmp_path, texts, limit, message
):
    """Raised when the task is built, before any training (the training split's too)."""
    root = write_corpus(tmp_path / "c", ("train.txt", "valid.txt", "test.txt"), texts)
    cfg = resolve_config("lm-awd", "tiny", {"data": {"limit_tokens": limit}}).task
    with pytest.raises(DataError) as e:
        awd.make(cfg, str(root))
    assert str(e.value) == message.format(root=root)


# -- the model's ingredients -----------------------------------------------------------------


def test_weight_drop_drops_hidden_weights_in_training_only_and_registers_them_once():
    torch.manual_seed(0)
    layer = LSTMLayer(6, 8, wdrop=0.5, dropout=0.0)
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["weight_ih", "weight_hh_raw", "bias_ih", "bias_hh"]
    assert len(list(layer.parameters())) == 4 and list(layer.state_dict()) == names
    layer.train()
    dropped = layer.weight_hh()
    zero = dropped == 0
    assert 0.3 < zero.float().mean() < 0.7  # about half of the entries dropped...
    assert torch.allclose(dropped[~zero], 2 * layer.weight_hh_raw[~zero])  # ...the rest rescaled
    x = torch.randn(5, 3, 6)
    assert not torch.allclose(layer(x)[0], layer(x)[0])  # a fresh mask per forward
    layer(x)[0].sum().backward()
    assert layer.weight_hh_raw.grad is not None and layer.weight_hh_raw.grad.abs().sum() > 0
    layer.eval()
    assert layer.weight_hh() is layer.weight_hh_raw
    # in eval it is exactly an LSTM with the raw weights (the kernel nn.LSTM uses)
    ref = nn.LSTM(6, 8)
    with torch.no_grad():
        for a, b in [
            ("weight_ih_l0", "weight_ih"),
            ("weight_hh_l0", "weight_hh_raw"),
            ("bias_ih_l0", "bias_ih"),
            ("bias_hh_l0", "bias_hh"),
        ]:
            getattr(ref, a).copy_(getattr(layer, b))
    assert torch.allclose(layer(x)[0], ref(x)[0], atol=1e-6)


def test_model_parameters_are_registered_once_and_tied_as_configured():
    for tie, shared in (("classifier", True), ("untie", False), ("none", False)):
        model = AWDLSTM(50, 8, 12, 3, tie=tie)
        params = dict(model.named_parameters())
        assert len(params) == 1 + 4 * 3 + (1 if shared else 2)
        assert (model.encoder.weight is model.decoder.weight) == shared


def test_dropouts_are_off_in_eval_and_ar_tar_enter_the_loss():
    cfg = tiny_cfg()
    task = awd.make(cfg.task)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches(torch.Generator().manual_seed(0), 1.0)))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch[0])[0], model(batch[0])[0])
        with_reg = task.loss(model, batch)
        plain = awd.make(cfg.updated({"loss": {"alpha": 0.0, "beta": 0.0}}).task).loss(model, batch)
        logits = model(batch[0])[0]
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))
    assert torch.allclose(plain, ce * batch[3]) and with_reg > plain


def test_variable_bptt_covers_the_epoch_in_order():
    cfg = tiny_cfg()
    task = awd.make(cfg.task)
    batches = list(task.train_batches(torch.Generator().manual_seed(1), 1.0))
    lengths = [b[0].shape[0] for b in batches]
    assert len(set(lengths)) > 1 and min(lengths) >= 1
    assert [b[2] for b in batches] == [True] + [False] * (len(batches) - 1)
    stream = torch.cat([b[0] for b in batches])
    assert torch.equal(
        torch.cat([b[1] for b in batches])[:-1], stream[1:]
    )  # targets are inputs shifted by one
    again = list(task.train_batches(torch.Generator().manual_seed(1), 1.0))
    assert [b[0].shape[0] for b in again] == lengths  # a pure function of the generator
    # the whole epoch: the corpus prefix the preset keeps, cut into batch_size streams side by side
    # (the remainder dropped), every token but each stream's first is a target exactly once
    d = cfg.task.data
    lines = corpus.load_wt2_small()["train"]
    words = [w for line in lines for w in line.split() + ["<eos>"]]
    assert len(words) > d.limit_tokens > 0
    steps = d.limit_tokens // d.batch_size
    assert sum(b[1].numel() for b in batches) == (steps - 1) * d.batch_size
    vocab = corpus.build_vocab(lines)
    ids = torch.tensor([vocab.index(w) for w in words[: steps * d.batch_size]])
    assert torch.equal(torch.cat([stream, batches[-1][1][-1:]]), ids.view(d.batch_size, steps).t())


# -- tied weights and blocks ----------------------------------------------------------------------


def test_tied_weights_across_a_split_are_an_error_unless_tie_is_given():
    model = AWDLSTM(50, 8, 12, 2, tie="classifier")
    spec = awd.block_names(awd.Model(layers=2))
    with pytest.raises(
        BlockError, match=r"encoder.weight = decoder.weight is shared by blocks \['decoder', 'embedding'\]"
    ):
        Blocks(model, spec)
    blocks = Blocks(model, spec, {"decoder.weight": "decoder"})
    assert (
        blocks.parameter_names()["embedding"] == []
        and "encoder.weight" in blocks.parameter_names()["decoder"]
    )
    with pytest.raises(ConfigError, match="model.tie is ''.*'classifier'.*'untie'.*'none'"):
        awd.make(tiny_cfg(tie="").task)
    proc = cli("cascade", "lm-awd", "--preset", "tiny", "--set", "model.tie=", "--out", "/nonexistent/never")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(
        "topdown: error: model.tie is"
    )
    cfg = tiny_cfg().updated({"cascade": {"splits": [3, 1]}})
    with pytest.raises(
        ConfigError,
        match="split 1: the feature extractor is only the embedding block, which owns no parameter",
    ):
        run_procedure("cascade", awd.make(cfg.task), "/nonexistent/never", config=cfg)


def _frozen_equal(run, summary, index, model_keys):
    """Frozen blocks of stage ``index`` are bit-identical to the best model it started from."""
    stage = summary["stages"][index]
    start = max(s["index"] for s in summary["stages"][:index] if s["accepted"])
    a = load_file(str(run / "checkpoints" / f"stage-{index}.safetensors"))
    b = load_file(str(run / "checkpoints" / f"stage-{start}.safetensors"))
    keys = [k for block in stage["frozen_blocks"] for k in model_keys[block]]
    assert keys
    for k in keys:
        assert torch.equal(a[k], b[k]), (index, k)
    trained = [k for block in stage["trained_blocks"] for k in model_keys[block]]
    assert any(not torch.equal(a[k], b[k]) for k in trained)


def test_tiny_cascade_end_to_end_with_frozen_blocks_bit_identical(tmp_path):
    cfg = tiny_cfg()
    task = awd.make(cfg.task)
    run = tmp_path / "run"
    summary = run_procedure("cascade", task, run, config=cfg, seed=0, preset="tiny")
    assert summary["status"] == "complete" and summary["metric"] == "ppl"
    assert [s["split"] for s in summary["stages"]] == [
        None,
        3,
        2,
    ]  # embedding owns nothing: split 1 is skipped
    assert (
        summary["config"]["cascade"]["splits"] is None
    )  # the task states its constraint; it does not edit the config
    info = summary["task_info"]
    assert (
        "NOT comparable with published WikiText-2" in info["note"]
        and len(info["vocab"]) == info["vocab_size"]
    )
    assert "NOT comparable" in (run / "report.md").read_text()
    keys = {
        "embedding": [],
        "lstm1": [
            k for k in load_file(str(run / "checkpoints/stage-0.safetensors")) if k.startswith("rnns.0.")
        ],
        "lstm2": [
            k for k in load_file(str(run / "checkpoints/stage-0.safetensors")) if k.startswith("rnns.1.")
        ],
        "decoder": ["decoder.weight", "decoder.bias", "encoder.weight"],
    }
    for index in (1, 2):
        _frozen_equal(run, summary, index, keys)
    for s in summary["stages"]:
        assert math.isclose(s["val"]["ppl"], math.exp(s["val"]["loss"]), rel_tol=1e-9)

    # tie=untie from the same baseline: the embedding is retrained, the decoder's matrix stays frozen
    ucfg = tiny_cfg(tie="untie")
    urun = tmp_path / "untie"
    usum = run_procedure(
        "cascade",
        awd.make(ucfg.task),
        urun,
        config=ucfg,
        seed=0,
        preset="tiny",
        from_checkpoint=str(run / "checkpoints" / "stage-0.safetensors"),
    )
    assert [s["split"] for s in usum["stages"]] == [None, 3, 2, 1]
    ukeys = {**keys, "embedding": ["encoder.weight"], "decoder": ["decoder.weight", "decoder.bias"]}
    for index in (1, 2, 3):
        _frozen_equal(urun, usum, index, ukeys)
    base = load_file(str(run / "checkpoints" / "stage-0.safetensors"))
    last = load_file(str(urun / "checkpoints" / "stage-3.safetensors"))
    assert not bool(last["tied"]) and torch.equal(last["decoder.weight"], base["decoder.weight"])
    assert not torch.equal(last["encoder.weight"], last["decoder.weight"])


# -- NT-ASGD (the loop's train.optimizer=ntasgd) -----------------------------------------------------


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))


def scalar_task(script):
    """loss = w, so SGD at lr 0.1 moves w by -0.1 per step (2 steps per epoch); validation is scripted
    and records the weight it saw."""
    seen = []

    def evaluate(model, split):
        seen.append(round(model.w.item(), 6))
        return {"loss": script[len(seen) - 1]}

    task = Task(
        name="scalar",
        build_model=Scalar,
        blocks=[],
        train_batches=lambda g, s: iter([0, 1]),
        loss=lambda model, batch: model.w.sum(),
        evaluate=evaluate,
        metric="loss",
    )
    return task, seen


def test_ntasgd_switches_on_the_non_monotone_condition_and_evaluates_averaged_weights():
    task, seen = scalar_task([5.0, 4.0, 3.0, 6.0, 7.0])
    model = Scalar()
    cfg = TrainConfig(
        epochs=5,
        optimizer="ntasgd",
        lr=0.1,
        momentum=0.0,
        clip=0.0,
        lr_decay=1.0,
        nonmono=2,
        restore_best=False,
    )
    fit(model, task, cfg, seed=0)
    # epochs 1-4 validate the raw iterate (0.8, 0.6, 0.4, 0.2); epoch 4 (6.0 > min(5.0), the epochs before the
    # last two) switches on averaging, so epoch 5 validates the mean of the iterates 0.2, 0.1, 0.0
    assert seen == [0.8, 0.6, 0.4, 0.2, 0.1]
    assert model.w.item() == pytest.approx(0.1)  # and the stage ends with the averaged weights
    task, seen = scalar_task([5.0, 4.0, 3.0, 2.0, 1.0])
    fit(Scalar(), task, cfg, seed=0)
    assert seen == [0.8, 0.6, 0.4, 0.2, 0.0]  # monotone improvement: plain SGD throughout


def test_ntasgd_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(
        epochs=6,
        optimizer="ntasgd",
        lr=0.1,
        momentum=0.0,
        clip=0.0,
        lr_decay=1.0,
        nonmono=1,
        restore_best=False,
    )
    script = [5.0, 4.0, 6.0, 7.0, 8.0, 9.0]
    task, seen = scalar_task(script)
    whole = Scalar()
    fit(whole, task, cfg, seed=0)
    task, seen_a = scalar_task(script)

    def kill(record):
        if record["epoch"] == 4:
            raise KeyboardInterrupt  # before epoch 4's resume point is written

    with pytest.raises(KeyboardInterrupt):
        fit(Scalar(), task, cfg, seed=0, resume_path=tmp_path / "r.safetensors", on_epoch=kill)
    task, seen_b = scalar_task(script[3:])
    resumed = Scalar()
    fit(resumed, task, cfg, seed=0, resume_path=tmp_path / "r.safetensors")
    assert seen_a[:3] + seen_b == seen and resumed.w.item() == pytest.approx(whole.w.item())


def test_retrain_and_transfer_classifier_run(tmp_path):
    cfg = resolve_config(
        "lm-awd", "tiny", {"model": {"tie": "untie"}, "procedure": {"split": 2}, "train": {"epochs": 1}}
    )
    task = awd.make(cfg.task)
    for procedure, subset, roles in (
        ("retrain-classifier", None, ["baseline", "retrain-classifier"]),
        ("transfer-classifier", 0.5, ["full-data baseline", "subset baseline", "transfer"]),
    ):
        config = cfg.updated({"procedure": {"subset": subset}})
        summary = run_procedure(procedure, task, tmp_path / procedure, config=config, seed=1, preset="tiny")
        assert [s["role"] for s in summary["stages"]] == roles
        assert all(math.isfinite(s["test"]["ppl"]) for s in summary["stages"])
