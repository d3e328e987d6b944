"""Stock Hugging Face architectures, built offline from tiny configs: proposed blocks, and a cascade
whose stage 0 is a ``save_pretrained`` directory (one file, shards, weights tied and left out)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import cli, read_summary
from safetensors.torch import load_file, save_file

import topdown
from topdown import Blocks, ConfigError, TopdownError
from topdown.pretrained import load_start

transformers = pytest.importorskip("transformers")


@dataclass
class Arch:
    build: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    stack: str  # its three layers


def tiny_wav2vec2() -> torch.nn.Module:
    """A random-weight Wav2Vec2ForCTC of three layers, small enough for a test (test_blocks uses it too)."""
    config = transformers.Wav2Vec2Config(
        vocab_size=8,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.5,
        mask_time_length=2,
    )
    return transformers.Wav2Vec2ForCTC(config)


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _tokens(g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 32, (4, 8), generator=g)
    return {"input_ids": ids, "labels": ids}


ARCHS = {
    "wav2vec2-ctc": Arch(
        tiny_wav2vec2,
        lambda g: {"input_values": torch.randn(2, 400, generator=g), "labels": torch.randint(1, 8, (2, 5))},
        "wav2vec2.encoder.layers",
    ),
    "bert-classifier": Arch(
        _bert,
        lambda g: {
            "input_ids": torch.randint(0, 32, (4, 8), generator=g),
            "labels": torch.tensor([0, 1, 2, 1]),
        },
        "bert.encoder.layer",
    ),
    "gpt2-lm": Arch(_gpt2, _tokens, "transformer.h"),
}


def saved(arch: Arch, directory, **kw) -> dict[str, torch.Tensor]:
    """A model with other weights than any the test builds, written by ``save_pretrained``."""
    torch.manual_seed(1234)
    model = arch.build()
    model.save_pretrained(directory, **kw)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ARCHS)
def test_proposed_blocks_put_each_parameter_in_one_block(name):
    arch = ARCHS[name]
    model = arch.build()
    proposal = topdown.propose_blocks(model)
    blocks = Blocks(model, *proposal)
    assert blocks.names == ["input", *[f"{arch.stack.rsplit('.', 1)[1]}.{i}" for i in range(3)], "output"]
    assert sorted(blocks.owner) == sorted(n for n, _ in model.named_parameters())
    assert proposal.spec[1][1] == [f"{arch.stack}.0"]
    grouped = topdown.propose_blocks(model, layers_per_block=2).spec
    assert [entries for _, entries in grouped[1:-1]] == [
        [f"{arch.stack}.0", f"{arch.stack}.1"],
        [f"{arch.stack}.2"],
    ]
    if name == "gpt2-lm":  # lm_head.weight is transformer.wte.weight: the classifier's
        assert proposal.shared == {"transformer.wte.weight": "output"}
        assert "transformer.wte.weight" in blocks.parameter_names()["output"]
    else:
        assert proposal.shared == {}


def test_propose_blocks_refuses_what_it_cannot_propose():
    with pytest.raises(topdown.BlockError, match="no stack of repeated layers"):
        topdown.propose_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(topdown.BlockError, match="'transformer.nothere' is no module with layers"):
        topdown.propose_blocks(_gpt2(), stack="transformer.nothere")
    with pytest.raises(topdown.BlockError, match="layers_per_block must be a positive int"):
        topdown.propose_blocks(_gpt2(), layers_per_block=0)


@pytest.mark.parametrize(
    ("name", "shard"), [("wav2vec2-ctc", None), ("bert-classifier", "20KB"), ("gpt2-lm", None)]
)
def test_a_cascade_starts_from_a_save_pretrained_directory(tmp_path, capsys, name, shard):
    """Stage 0 is the saved model; stage 1 re-initialises the blocks below the split as a fresh build
    does, trains them, and leaves the blocks above it bit-identical."""
    arch = ARCHS[name]
    directory = tmp_path / "pretrained"
    weights = saved(arch, directory, **({"max_shard_size": shard} if shard else {}))
    assert (directory / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()
    torch.manual_seed(0)
    proposal = topdown.propose_blocks(arch.build())
    plan = topdown.Cascade(
        arch.build(),
        proposal.spec,
        shared=proposal.shared,
        build_model=arch.build,
        metric="loss",
        config={"cascade": {"splits": [2]}},  # input and the first layer below, the rest frozen above
        from_checkpoint=str(directory),
    )
    g = torch.Generator().manual_seed(0)
    roles = []
    for stage in plan:
        model, roles = stage.model, [*roles, stage.role]
        start = {k: v.clone() for k, v in model.state_dict().items()}
        trained_keys = plan.blocks.state_keys(stage.trained_blocks) if stage.trained_blocks else []
        if stage.index == 0:
            assert all(torch.equal(start[k], weights[k]) for k in start), "stage 0 is the saved model"
            assert not stage.trainable_parameters()
        else:
            assert stage.trained_blocks == ["input", proposal.spec[1][0]]
            torch.manual_seed(stage.seed)
            fresh = arch.build().state_dict()
            for key in trained_keys:
                assert torch.equal(start[key], fresh[key]), f"{key} is not re-initialised as built"
            opt = torch.optim.Adam(stage.trainable_parameters(), lr=0.01)
            model.train()
            for _ in range(2):
                loss = model(**arch.batch(g)).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            after = model.state_dict()
            for key in plan.blocks.state_keys(stage.frozen_blocks):
                assert torch.equal(after[key], weights[key]), f"frozen {key} moved"
            for block in stage.trained_blocks:
                keys = plan.blocks.state_keys([block])
                assert any(not torch.equal(after[k], start[k]) for k in keys), f"{block} did not train"
        if name == "gpt2-lm":  # left out of the file, tied in the model, frozen with the output block
            assert model.lm_head.weight is model.transformer.wte.weight
            assert torch.equal(model.lm_head.weight, weights["transformer.wte.weight"])
        model.eval()
        with torch.no_grad():
            stage.finish(val={"loss": model(**arch.batch(torch.Generator().manual_seed(1))).loss.item()})
    assert roles == ["loaded", "cascade"]
    assert "runs the blocks in the order" not in capsys.readouterr().err  # the order check passed
    assert plan.summary["stages"][0]["source"] == str(directory)


def test_tied_weights_are_left_out_and_shards_are_merged(tmp_path):
    weights = saved(ARCHS["gpt2-lm"], tmp_path, max_shard_size="20KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 2 and "lm_head.weight" not in shards
    model = _gpt2()
    load_start(model, tmp_path)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def _untied_key_removed(directory, key: str) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors[key]
    save_file(tensors, str(directory / "model.safetensors"))


def test_a_checkpoint_that_lacks_an_untied_weight_is_refused_in_one_line(tmp_path):
    saved(ARCHS["gpt2-lm"], tmp_path / "pretrained")
    _untied_key_removed(tmp_path / "pretrained", "transformer.ln_f.bias")
    model = _gpt2()
    proposal = topdown.propose_blocks(model)
    plan = topdown.Cascade(
        model,
        proposal.spec,
        shared=proposal.shared,
        build_model=_gpt2,
        metric="loss",
        from_checkpoint=str(tmp_path / "pretrained"),
    )
    with pytest.raises(ConfigError, match=r"does not fit the model: it lacks transformer\.ln_f\.bias \(only"):
        next(iter(plan))
    saved(ARCHS["gpt2-lm"], tmp_path / "whole")
    untied = _gpt2()  # a model that does not tie: the file's missing lm_head.weight is its own
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(ConfigError, match=r"it lacks lm_head\.weight \(only"):
        load_start(untied, tmp_path / "whole")


def test_a_checkpoint_with_other_names_or_shapes_is_refused(tmp_path):
    saved(ARCHS["bert-classifier"], tmp_path)
    gpt2 = _gpt2()
    with pytest.raises(
        ConfigError, match=r"does not fit the model: it holds bert\.\S+, bert\.\S+, bert\.\S+ and"
    ):
        load_start(gpt2, tmp_path)
    config = _bert().config
    config.num_labels = 5
    with pytest.raises(
        ConfigError,
        match=r"does not fit the model: Error.* size mismatch for classifier\.weight: .*\[3, 16\]",
    ):
        load_start(transformers.BertForSequenceClassification(config), tmp_path)


def test_a_missing_shard_is_one_line_and_nothing_is_written(tmp_path):
    directory = tmp_path / "pretrained"
    saved(ARCHS["gpt2-lm"], directory, max_shard_size="20KB")
    lost = sorted(directory.glob("model-*.safetensors"))[-1]
    lost.unlink()
    model = _gpt2()
    proposal = topdown.propose_blocks(model)
    with pytest.raises(
        TopdownError, match=rf"lacks {re.escape(lost.name)}, named by its model.safetensors.index"
    ):
        topdown.Cascade(
            model,
            proposal.spec,
            shared=proposal.shared,
            build_model=_gpt2,
            metric="loss",
            out=tmp_path / "run",
            from_checkpoint=str(directory),
        )
    assert not (tmp_path / "run").exists()
    proc = cli(
        "cascade", "digits", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--from", str(directory)
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"topdown: error: checkpoint {directory} lacks {lost.name}, named by its model.safetensors.index.json"
    ]
    assert not (tmp_path / "cli").exists()


def test_a_run_built_on_a_directory_is_not_resumed_from_other_weights(tmp_path):
    directory, run = tmp_path / "pretrained", tmp_path / "run"
    saved(ARCHS["gpt2-lm"], directory)
    proposal = topdown.propose_blocks(_gpt2())

    def cascade(**kw) -> topdown.Cascade:
        return topdown.Cascade(
            _gpt2(), proposal.spec, shared=proposal.shared, build_model=_gpt2, metric="loss", out=run, **kw
        )

    for stage in cascade(from_checkpoint=str(directory)):  # stage 0 recorded, then stopped
        stage.finish(val={"loss": 1.0})
        break
    assert read_summary(run)["stages"][0]["source"] == str(directory)
    cascade(from_checkpoint=str(directory), resume=True)  # the same weights: it continues
    _gpt2().save_pretrained(directory)  # other weights in the same place
    with pytest.raises(TopdownError, match=r"cannot resume .*: it started from other weights than"):
        cascade(from_checkpoint=str(directory), resume=True)
