"""How a character-CTC ASR task is put together from the shared parts: its config sections
(``data``, ``topdown.tasks.asr.data``; ``decode``, ``topdown.tasks.asr.decoding``; the model's),
the CTC loss, and the ``Task`` that trains on the prepared data and reports WER/CER from greedy,
beam-search and LM-fused decoding.

A model plugs in as ``model(feats, lengths) -> (logits (B, T, V), out_lengths)``; a task
module supplies ``build_model(cfg, inputs=..., vocab=...)`` and the length of its output
for a given number of input frames (for the "too few frames for the transcript" check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from topdown.sections import Section, TaskSections
from topdown.task import Task, subset_size
from topdown.tasks.asr.data import BLANK, Data, Example, SpecAugment, batches, prepare, spec_augment
from topdown.tasks.asr.decoding import Decode, error_rates, transcribe, word_scorer


def sections(model: type[Section]) -> dict[str, type[Section]]:
    """An ASR task's declared sections: the shared data and decoding options and its model's."""
    return {"data": Data, "decode": Decode, "model": model}


def ctc(
    logits: torch.Tensor,
    out_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, targets, out_lengths, target_lengths, blank=BLANK, reduction=reduction)


def forward_split(
    model: nn.Module, examples: list[Example], batch_size: int
) -> tuple[list[Example], list[tuple], float]:
    """The model's outputs over ``examples`` in length order: the examples in that order, one
    (logits, output lengths) per batch, and the mean CTC loss per utterance. Decoding with any
    settings (``transcribe``) then needs no second forward pass."""
    device = next(model.parameters()).device
    examples = sorted(examples, key=lambda e: len(e.feats))
    outputs, total = [], 0.0
    for batch in batches(examples, batch_size, None):
        feats, lengths, targets, target_lengths = (t.to(device) for t in batch)
        logits, out_lengths = model(feats, lengths)
        total += ctc(logits, out_lengths, targets, target_lengths, reduction="sum").item()
        outputs.append((logits, out_lengths))
    return examples, outputs, total / len(examples)


def make_task(
    name: str,
    cfg: TaskSections,
    data_dir: str | None,
    build_model,
    block_names,
    out_length: Callable[[int], int] | None = None,
) -> Task:
    """A ``Task`` for a CTC model over the prepared data. ``build_model(cfg, inputs=, vocab=)``."""
    data, info, vocab = prepare(cfg.data, data_dir, out_length)
    batch_size = cfg.data.batch_size
    augment = cfg.data.spec_augment if cfg.data.augment else SpecAugment()  # no masks: none
    stack = cfg.data.stack  # SpecAugment bands cover the same dimensions of each stacked frame
    decode = cfg.decode

    def train_batches(generator: torch.Generator, subset: float):
        return batches(data["train"][: subset_size(len(data["train"]), subset)], batch_size, generator)

    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        feats, lengths, targets, target_lengths = batch
        return ctc(*model(spec_augment(feats, lengths, augment, stack), lengths), targets, target_lengths)

    scorer = (
        word_scorer(
            data["train"],
            vocab,
            decode.lm_order,
            decode.lm_weight,
            decode.word_bonus,
            decode.oov_penalty,
        )
        if decode.lm_order
        else None
    )

    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        beam = decode.beam if split == "test" or decode.on_val else 0
        examples, outputs, loss = forward_split(model, data[split], batch_size)
        refs = [e.text for e in examples]
        metrics = {**error_rates(transcribe(outputs, vocab), refs), "loss": loss}
        if beam:
            metrics.update(error_rates(transcribe(outputs, vocab, beam, decode.prune), refs, "_beam"))
        if beam and scorer:
            metrics.update(error_rates(transcribe(outputs, vocab, beam, decode.prune, scorer), refs, "_lm"))
        return metrics

    return Task(
        name=name,
        build_model=lambda: build_model(cfg, inputs=info["features"]["dim"], vocab=len(vocab)),
        blocks=block_names(cfg.model),
        train_batches=train_batches,
        loss=loss,
        evaluate=evaluate,
        metric="wer",
        lower_is_better=True,
        info=info,
    )
