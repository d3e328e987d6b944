"""``lm-awd``: word-level language modelling with an AWD-LSTM on WT2-small (the paper's WikiText-2
result, at CPU scale).

Blocks, input to output: ``embedding``, ``lstm1`` .. ``lstmN`` (one LSTM layer each, with
its weight-drop and output dropout), ``decoder`` (the softmax layer). The embedding and
softmax matrices are tied, so they cross every split: ``model.tie`` says what happens
(``classifier``: the tied matrix is the decoder's, frozen with the classifier; ``untie``:
separate matrices after the baseline; ``none``: never tied). See docs/lm.md.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from topdown.sections import Section, TaskSections, option
from topdown.task import Task, data_location, subset_size
from topdown.tasks.lm import corpus
from topdown.tasks.lm.model import AWDLSTM, TIE_MODES, detach
from topdown.tasks.regime import Regime, span

LIGHT_DROPOUT = {"dropouti": 0.4, "dropouth": 0.2, "dropout": 0.3, "wdrop": 0.3}


@dataclass(frozen=True)
class Data(Regime):
    """The regime options (``topdown.tasks.regime``: the subset is a contiguous span of the training
    text; no label noise, no augmentation), then bptt 70, eval batch 10 and variable-length BPTT as
    AWD-LSTM; batch 20 (AWD-LSTM: 80) for a CPU."""

    TARGETS: ClassVar[str] = "running text (each next word)"
    batch_size: int = option(20, ge=1)
    eval_batch_size: int = option(10, ge=1)
    bptt: int = option(70, ge=2)
    variable_bptt: bool = True
    limit_tokens: int = option(0, ge=0)  # > 0: only a prefix of each split (the tiny preset)


def _dropout(p: float):
    return option(p, ge=0, lt=1)


@dataclass(frozen=True)
class Model(Section):
    """AWD-LSTM's regularisation defaults; CPU sizes (the paper's are the `paper` preset)."""

    SECTION: ClassVar[str] = "model"
    emsize: int = option(64, ge=1)
    hidden: int = option(128, ge=1)
    layers: int = option(3, ge=1)
    # the tied embedding/softmax matrix crosses every split, so say what it belongs to: classifier
    # (the decoder owns it, frozen with the classifier), untie (separate matrices after the
    # baseline) or none (never tied)
    tie: str = option("classifier", choices=TIE_MODES)
    dropoute: float = _dropout(0.1)
    dropouti: float = _dropout(0.65)
    dropouth: float = _dropout(0.3)
    dropout: float = _dropout(0.4)
    wdrop: float = _dropout(0.5)


@dataclass(frozen=True)
class Loss(Section):
    SECTION: ClassVar[str] = "loss"
    alpha: float = option(2.0, ge=0)  # activation regularisation (AR)
    beta: float = option(1.0, ge=0)  # temporal activation regularisation (TAR)


SECTIONS = {"data": Data, "model": Model, "loss": Loss}
DEFAULTS: dict[str, Any] = {
    # NT-ASGD (the loop's `ntasgd`): SGD at lr 30 without momentum, clip 0.25, weight decay
    # 1.2e-6, nonmono 5, no plateau decay; early stopping on validation perplexity ends each
    # stage (AWD-LSTM trains one run for 750 epochs instead)
    "train": {
        "optimizer": "ntasgd",
        "nonmono": 5,
        "lr": 30.0,
        "momentum": 0.0,
        "clip": 0.25,
        "weight_decay": 1.2e-6,
        "lr_decay": 1.0,
        "epochs": 2,
        "early_stop": 2,
    },
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "data": {"batch_size": 4, "eval_batch_size": 4, "bptt": 12, "limit_tokens": 1200},
        "model": {"emsize": 8, "hidden": 12, "layers": 2},
    },
    # AWD-LSTM's dropout is sized for a 400/1150 model trained 750 epochs; a 64/128 model
    # trained a few epochs per stage does better with lighter dropout
    "demo": {"data": {"bptt": 35}, "model": LIGHT_DROPOUT},
    # bench: NT-ASGD's optimizer for 40 epochs under a cosine schedule to lr 0, the best validation
    # epoch kept: a schedule that ends, so the baseline has converged within its budget and the
    # equal-epochs control is the same recipe over a longer schedule (160 epochs of it reached
    # 142-146 against 159-164: not converged beyond 40). NT-ASGD at a constant lr 30 (early stop 5)
    # was 2.4 validation ppl better at epoch 40 but still improving (seed 0: 158.5 against 160.9;
    # bench/RESULTS.md, 2026-11-30)
    "bench": {
        "data": {"bptt": 35},
        "model": LIGHT_DROPOUT,
        "train": {"epochs": 40, "early_stop": 0, "nonmono": 5, "schedule": "cosine"},
    },
    # Merity et al.'s WikiText-2 recipe (3 layers, 400/1150, tied, dropouth 0.2, batch 80,
    # 750 epochs): for a GPU and the full corpus (--data-dir); not run here.
    "paper": {
        "data": {"batch_size": 80},
        "model": {"emsize": 400, "hidden": 1150, "layers": 3, "dropouth": 0.2},
        "train": {"epochs": 750, "early_stop": 0, "amp": "bf16"},
    },
}


def block_names(model_cfg: Model) -> list[tuple[str, list[str]]]:
    layers = [(f"lstm{i + 1}", [f"rnns.{i}"]) for i in range(model_cfg.layers)]
    return [("embedding", ["encoder"]), *layers, ("decoder", ["decoder"])]


def build_model(cfg: TaskSections, vocab_size: int | None = None) -> AWDLSTM:
    m = cfg.model
    vocab_size = vocab_size or 13777  # without a corpus (`topdown list`): the WT2-small vocabulary's size
    return AWDLSTM(
        vocab_size,
        m.emsize,
        m.hidden,
        m.layers,
        tie=m.tie,
        dropoute=m.dropoute,
        dropouti=m.dropouti,
        dropouth=m.dropouth,
        dropout=m.dropout,
        wdrop=m.wdrop,
    )


def load_corpus(
    data_cfg: Data, data_dir: str | None
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Path]]:
    """Vocabulary (from training), the token streams of the three splits, and each split's file
    for error messages (none for the bundled corpus, whose splits are cut from two files)."""
    paths = {} if data_dir is None else corpus.standard_paths(data_dir)
    lines = corpus.load_wt2_small() if data_dir is None else corpus.load_standard(paths)
    vocab = corpus.build_vocab(lines["train"])
    ids = {split: corpus.encode(lines[split], vocab, split, paths.get(split)) for split in corpus.SPLITS}
    if data_cfg.limit_tokens > 0:  # the tiny preset: a prefix of each split
        ids = {split: t[: data_cfg.limit_tokens] for split, t in ids.items()}
    return vocab, ids, paths


def make(cfg: TaskSections, data_dir: str | None = None) -> Task:
    d, lcfg = cfg.data, cfg.loss
    vocab, ids, paths = load_corpus(d, data_dir)
    regime = {}
    if d.fraction < 1:  # a span of the training text; the vocabulary is still the whole split's
        whole, part = len(ids["train"]), span(len(ids["train"]), d.fraction, d.seed)
        ids["train"] = ids["train"][part]
        regime = {"tokens": len(ids["train"]), "of": whole, "start": part.start}
    blocks = block_names(cfg.model)
    bptt = d.bptt
    hidden: dict[str, Any] = {"state": None}  # carried from batch to batch within an epoch

    def batchify(split: str, stream: torch.Tensor) -> torch.Tensor:
        """At the split's batch size; too short a split is an error naming its file and the options
        that fix it."""
        key = "batch_size" if split == "train" else "eval_batch_size"
        limited = 0 < d.limit_tokens <= len(stream)  # the prefix may be what is too short
        fix = f", or raise data.limit_tokens ({d.limit_tokens})" if limited else ""
        if split == "train" and d.fraction < 1:
            fix += f", or raise data.fraction ({d.fraction:g})"
        return corpus.batchify(
            stream, getattr(d, key), corpus.describe(split, paths.get(split)), f"data.{key}", fix
        )

    train_streams: dict[float, torch.Tensor] = {}

    def train_stream(subset: float) -> torch.Tensor:
        """A fixed prefix of the token stream: the same subset for every seed."""
        if subset not in train_streams:
            n = subset_size(
                len(ids["train"]), subset, least=2 * d.batch_size + 1
            )  # each batch column an input and its target
            train_streams[subset] = batchify("train", ids["train"][:n])
        return train_streams[subset]

    train_stream(1.0)  # a training split too short for its batch size stops the run here, before any training
    evals = {split: batchify(split, ids[split]) for split in ("val", "test")}

    def train_batches(generator: torch.Generator, subset: float):
        """One epoch in corpus order; variable-length BPTT windows drawn from ``generator``.

        A batch is (inputs, targets, first-of-epoch, seq_len / bptt).
        """
        data = train_stream(subset)
        i, first = 0, True
        while i < len(data) - 1:
            seq_len = bptt
            if (
                d.variable_bptt
            ):  # AWD-LSTM: bptt, or bptt/2 with probability 0.05, plus N(0, 5) jitter, at least 5
                base = bptt if torch.rand((), generator=generator).item() < 0.95 else bptt / 2
                seq_len = max(5, int(base + 5 * torch.randn((), generator=generator).item()))
            seq_len = min(seq_len, len(data) - 1 - i)
            yield data[i : i + seq_len], data[i + 1 : i + 1 + seq_len], first, seq_len / bptt
            i, first = i + seq_len, False

    def loss(model: nn.Module, batch) -> torch.Tensor:
        """Cross-entropy + AR + TAR, scaled by seq_len / bptt (AWD-LSTM scales the lr instead)."""
        x, y, first, scale = batch
        if first:
            hidden["state"] = None
        logits, state, raw, dropped = model(x, hidden["state"])
        hidden["state"] = detach(state)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if lcfg.alpha:
            total = total + lcfg.alpha * dropped.pow(2).mean()
        if lcfg.beta and raw.shape[0] > 1:
            total = total + lcfg.beta * (raw[1:] - raw[:-1]).pow(2).mean()
        return total * scale

    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        data = evals[split]
        device = next(model.parameters()).device
        total, count, state = 0.0, 0, None
        for i in range(0, len(data) - 1, bptt):
            n = min(bptt, len(data) - 1 - i)
            x, y = data[i : i + n].to(device), data[i + 1 : i + 1 + n].to(device)
            logits, state, _, _ = model(x, state)
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
        mean = total / count
        return {"ppl": math.exp(min(mean, 700.0)), "loss": mean}

    info = {
        "corpus": "WT2-small (bundled)" if data_dir is None else "standard layout",
        **({} if data_dir is None else data_location(data_dir)),
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256("\n".join(vocab).encode()).hexdigest(),
        "vocab": vocab,
        "tokens": {split: len(t) for split, t in ids.items()},
        **({"regime": regime} if regime else {}),
    }
    if data_dir is None:
        info["note"] = corpus.NOT_COMPARABLE
    shared = {"decoder.weight": "decoder"} if cfg.model.tie == "classifier" else {}
    return Task(
        name="lm-awd",
        build_model=lambda: build_model(cfg, len(vocab)),
        blocks=blocks,
        train_batches=train_batches,
        loss=loss,
        evaluate=evaluate,
        metric="ppl",
        lower_is_better=True,
        shared=shared,
        info=info,
    )
