"""What every character-CTC ASR task shares: features, speaker-held-out validation, batching,
the CTC loss, greedy decoding and WER/CER. A model plugs in as ``model(feats, lengths) ->
(logits (B, T, V), out_lengths)``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import editdistance
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...errors import DataError
from ...task import Task
from . import an4

BLANK = 0
VOCAB = len(an4.ALPHABET) + 1  # CTC blank + space + A-Z
_INDEX = {c: i + 1 for i, c in enumerate(an4.ALPHABET)}

DATA_DEFAULTS: dict[str, Any] = {
    "val_speakers": 8,  # training speakers held out for validation (never test speakers)
    "deltas": True,  # append deltas and delta-deltas to the 13 cepstra
    "stack": 4,  # stack this many frames and keep every n-th (100 fps -> 25 fps)
    "batch_size": 8,  # small batches: more updates per epoch get CTC past its all-blank phase sooner
    "limit": 0,  # use only the first N utterances of each split (0 = all); for tiny presets
}


@dataclass
class Example:
    uid: str
    feats: torch.Tensor  # (frames, dims) float32, normalised
    target: torch.Tensor  # (chars,) int64, no blanks
    text: str


def feature_dim(data_cfg: dict[str, Any]) -> int:
    return an4.N_CEPS * (3 if data_cfg["deltas"] else 1) * data_cfg["stack"]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.int64)


def load_corpus(data_dir: str | None) -> dict[str, list[an4.Utterance]]:
    """The bundled AN4, or an AN4-style Sphinx layout (``etc/`` and ``feat/``) at ``data_dir``."""
    if data_dir is None:
        return an4.load_bundle(an4.bundled_path())
    root = Path(data_dir)
    if not (root / "etc").is_dir():
        raise DataError(f"{root}: expected an AN4-style Sphinx layout with etc/ and feat/")
    return an4.load_sphinx(root)


def split_speakers(train: list[an4.Utterance], n_val: int) -> tuple[list[an4.Utterance], list[an4.Utterance]]:
    """Hold out ``n_val`` whole training speakers, chosen by a fixed RNG (the same for every run seed)."""
    speakers = sorted({u.speaker for u in train})
    if not 0 < n_val < len(speakers):
        raise DataError(f"val_speakers={n_val}, but the training set has {len(speakers)} speakers")
    held = set(np.random.default_rng(0).choice(speakers, n_val, replace=False).tolist())
    return [u for u in train if u.speaker not in held], [u for u in train if u.speaker in held]


def prepare(data_cfg: dict[str, Any], data_dir: str | None) -> dict[str, list[Example]]:
    """Features (deltas, training-set normalisation, frame stacking) and targets for train/val/test."""
    corpus = load_corpus(data_dir)
    train, val = split_speakers(corpus["train"], data_cfg["val_speakers"])
    splits = {"train": train, "val": val, "test": corpus["test"]}
    if data_cfg["limit"]:
        splits = {k: v[: data_cfg["limit"]] for k, v in splits.items()}
    for name, utts in splits.items():
        if not utts:
            raise DataError(f"the {name} set is empty")
        for u in utts:
            an4.check_text(u.uid, u.text)

    def raw(u: an4.Utterance) -> np.ndarray:
        return an4.add_deltas(u.feats) if data_cfg["deltas"] else u.feats

    norm = an4.Normalizer.fit([raw(u) for u in splits["train"]])
    out = {}
    for name, utts in splits.items():
        examples = []
        for u in utts:
            feats = torch.from_numpy(an4.stack_frames(norm(raw(u)), data_cfg["stack"]).astype(np.float32))
            target = encode(u.text)
            repeats = int((target[1:] == target[:-1]).sum())
            if len(feats) < len(target) + repeats:
                raise DataError(f"utterance {u.uid}: {len(feats)} frames after stacking by {data_cfg['stack']} are too few for its {len(target)} characters")
            examples.append(Example(u.uid, feats, target, u.text))
        out[name] = examples
    return out


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded features (B, T, D), their lengths, concatenated targets, target lengths."""
    lengths = torch.tensor([len(e.feats) for e in examples])
    feats = nn.utils.rnn.pad_sequence([e.feats for e in examples], batch_first=True)
    return feats, lengths, torch.cat([e.target for e in examples]), torch.tensor([len(e.target) for e in examples])


def batches(examples: list[Example], batch_size: int, generator: torch.Generator | None) -> Iterator[tuple]:
    """Length-sorted batches (little padding). Training shuffles within pools of 8 batches and
    shuffles the batch order; evaluation (``generator=None``) goes in length order."""
    if generator is None:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].feats))
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        perm = torch.randperm(len(examples), generator=generator).tolist()
        pool = batch_size * 8
        groups = []
        for p in range(0, len(perm), pool):
            chunk = sorted(perm[p : p + pool], key=lambda i: len(examples[i].feats))
            groups += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    for group in groups:
        yield collate([examples[i] for i in group])


def ctc(logits: torch.Tensor, out_lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, targets, out_lengths, target_lengths, blank=BLANK, reduction=reduction)


def ctc_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The training loss: CTC, averaged over the batch (each utterance's loss per target character)."""
    feats, lengths, targets, target_lengths = batch
    return ctc(*model(feats, lengths), targets, target_lengths)


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best = logits.argmax(-1).cpu()
    out = []
    for seq, n in zip(best, lengths.tolist()):
        seq = torch.unique_consecutive(seq[:n])
        out.append("".join(an4.ALPHABET[i - 1] for i in seq.tolist() if i != BLANK))
    return out


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER (edit distance summed over utterances / reference length)."""
    word_errors = sum(editdistance.eval(h.split(), r.split()) for h, r in zip(hyps, refs))
    char_errors = sum(editdistance.eval(h, r) for h, r in zip(hyps, refs))
    return {
        "wer": word_errors / max(1, sum(len(r.split()) for r in refs)),
        "cer": char_errors / max(1, sum(len(r) for r in refs)),
    }


def make_task(name: str, cfg: dict[str, Any], data_dir: str | None, build_model, block_names) -> Task:
    """A ``Task`` for a CTC model over the prepared AN4-style data."""
    data = prepare(cfg["data"], data_dir)
    batch_size = cfg["data"]["batch_size"]

    def train_batches(generator: torch.Generator, subset: float):
        n = max(1, round(len(data["train"]) * subset))  # a fixed subset: the first n utterances
        return batches(data["train"][:n], batch_size, generator)

    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        device = next(model.parameters()).device
        hyps, total = [], 0.0
        examples = sorted(data[split], key=lambda e: len(e.feats))
        for batch in batches(examples, batch_size, None):
            feats, lengths, targets, target_lengths = (t.to(device) for t in batch)
            logits, out_lengths = model(feats, lengths)
            total += ctc(logits, out_lengths, targets, target_lengths, reduction="sum").item()
            hyps += greedy_decode(logits, out_lengths)
        refs = [e.text for e in examples]
        return {**error_rates(hyps, refs), "loss": total / len(examples)}

    return Task(
        name=name,
        build_model=lambda: build_model(cfg),
        blocks=block_names(cfg["model"]),
        train_batches=train_batches,
        loss=ctc_loss,
        evaluate=evaluate,
        metric="wer",
        lower_is_better=True,
    )
