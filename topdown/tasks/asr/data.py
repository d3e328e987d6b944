"""The data every character-CTC ASR task shares: its options (``data``, ``data.spec_augment``),
the corpus (bundled AN4, an AN4-style Sphinx layout, or Kaldi data directories), features and
their normalisation, the character vocabulary, speaker-held-out validation, batching and
SpecAugment-style masking."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from topdown.console import warn
from topdown.errors import ConfigError, DataError
from topdown.sections import Section, option
from topdown.task import data_location
from topdown.tasks.asr import an4, kaldi
from topdown.tasks.asr.filterbank import Fbank
from topdown.tasks.regime import Regime, group_subset

BLANK = 0
BLANK_SYMBOL = "<blank>"


@dataclass(frozen=True)
class SpecAugment(Section):
    """SpecAugment-style masking of the (normalised) training features; 0 masks = off."""

    SECTION: ClassVar[str] = "data.spec_augment"
    freq_masks: int = option(0, ge=0)
    freq_width: int = option(0, ge=0)
    time_masks: int = option(0, ge=0)
    time_width: int = option(0, ge=0)


@dataclass(frozen=True)
class Data(Regime):
    """The regime options (``topdown.tasks.regime``: the subset is whole speakers; ``augment``, true
    here, switches ``spec_augment`` off whatever its masks), then the corpus's."""

    TARGETS: ClassVar[str] = "transcripts"
    AUGMENTS: ClassVar[bool] = True
    augment: bool = True
    val_speakers: int = option(
        8, ge=1
    )  # training speakers held out for validation when there is no dev set (never test speakers)
    deltas: bool = True  # append deltas and delta-deltas to the input features
    # mean/variance normalisation (after deltas): "global" = training-set statistics;
    # "speaker" = each speaker's own statistics (per split; utterances without a speaker are
    # their own), as Kaldi's apply-cmvn with spk2utt; "utterance" = each utterance's own
    cmvn: str = option("global", choices=("global", "speaker", "utterance"))
    stack: int = option(4, ge=1)  # stack this many frames and keep every n-th (100 fps -> 25 fps)
    batch_size: int = option(
        8, ge=1
    )  # small batches: more updates per epoch get CTC past its all-blank phase sooner
    limit: int = option(0, ge=0)  # use only the first N utterances of each split (0 = all); for tiny presets
    # Kaldi data: "" = a character unseen in training is an error; else unseen characters map to this symbol
    unk: str = ""
    # words removed from every transcript before training and scoring: non-linguistic symbols such as
    # WSJ's <NOISE> (ESPnet's --nlsyms); an utterance left with no words is left out, with a warning
    remove_tokens: list[str] = field(default_factory=list)
    fbank: Fbank = field(default_factory=Fbank)  # Kaldi wav.scp: the log-mel filterbank front end
    spec_augment: SpecAugment = field(default_factory=SpecAugment)

    def check_relations(self) -> None:
        super().check_relations()
        if not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in self.remove_tokens):
            raise ConfigError(
                "data.remove_tokens must be a list of words (no spaces), e.g. [<NOISE>], got "
                f"{self.remove_tokens!r}"
            )


@dataclass
class Example:
    uid: str
    feats: torch.Tensor  # (frames, dims) float32, normalised
    target: torch.Tensor  # (chars,) int64, no blanks
    text: str


UNKNOWN_CHAR = "\ufffd"  # how a hypothesis spells the unknown symbol (Vocab.decode)


class Vocab:
    """Output symbols: index 0 is the CTC blank, then one symbol per character (and the unknown
    symbol, if any)."""

    def __init__(self, chars: list[str], unk: str = ""):
        self.symbols = [BLANK_SYMBOL, *chars, *([unk] if unk else [])]
        self.unk = unk
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_texts(cls, texts: list[str], unk: str = "") -> Vocab:
        chars = sorted({c for t in texts for c in t})
        if unk and unk in chars:
            raise DataError(
                f"data.unk {unk!r} occurs in the training transcripts; choose a symbol that does not"
            )
        return cls(chars, unk)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, where: str) -> torch.Tensor:
        ids = []
        for c in text:
            i = self.index.get(c)
            if i is None or i == BLANK:
                if not self.unk:
                    raise DataError(
                        f"{where}: character {c!r} does not occur in the training transcripts (set "
                        "data.unk=SYMBOL to map unseen characters to SYMBOL)"
                    )
                i = self.index[self.unk]
            ids.append(i)
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: list[int]) -> str:
        """Text for scoring. The unknown symbol is one character, U+FFFD, whatever its spelling
        (``<unk>``): it stands for one unseen reference character, so CER counts one edit, not five."""
        return "".join(
            UNKNOWN_CHAR if self.unk and i == self.index[self.unk] else self.symbols[i]
            for i in ids
            if i != BLANK
        )


AN4_VOCAB = Vocab(list(an4.ALPHABET))


def feature_dim(data_cfg: Data, raw: int = an4.N_CEPS) -> int:
    return raw * (3 if data_cfg.deltas else 1) * data_cfg.stack


@dataclass
class Corpus:
    splits: dict[str, list[an4.Utterance]]  # train, val, test
    vocab: Vocab
    facts: dict[str, Any]  # where the data came from
    origins: dict[
        str, str
    ]  # split -> where its utterances are, for messages: a Kaldi root's validation set is its dev/ directory


def load_corpus(data_cfg: Data, data_dir: str | None) -> Corpus:
    """The bundled AN4, an AN4-style Sphinx layout (``etc/`` and ``feat/``), or Kaldi data
    directories (``ROOT/train``, ``ROOT/test``, optional ``ROOT/dev``) at ``data_dir``."""
    if data_dir is None:
        raw, facts = an4.load_bundle(an4.bundled_path()), {"corpus": "an4 (bundled)"}
    else:
        root = Path(data_dir)
        if (root / "etc").is_dir():
            raw, facts = an4.load_sphinx(root), {"corpus": "an4 sphinx layout", **data_location(root)}
        elif (root / "train").is_dir():
            raw, facts = kaldi.load_root(root, data_cfg.fbank)
            facts = {"corpus": "kaldi data directories", **data_location(root), **facts}
        elif not root.is_dir():
            raise DataError(f"{root}: data directory not found")
        else:
            raise DataError(
                f"{root}: expected Kaldi data directories ({root}/train, {root}/test, optional {root}/dev) "
                "or an AN4-style Sphinx layout with etc/ and feat/"
            )
    if data_cfg.remove_tokens:
        raw = {name: _without_tokens(utts, data_cfg.remove_tokens, name) for name, utts in raw.items()}
        facts = {**facts, "removed_tokens": list(data_cfg.remove_tokens)}
    origins = {"train": "train", "val": "train, held out for validation", "test": "test"}
    if "dev" in raw:
        splits = {"train": raw["train"], "val": raw["dev"], "test": raw["test"]}
        origins["val"] = "dev"
    else:
        train, val = split_speakers(raw["train"], data_cfg.val_speakers)
        splits = {"train": train, "val": val, "test": raw["test"]}
    if data_cfg.limit:
        splits = {k: v[: data_cfg.limit] for k, v in splits.items()}
    for name, utts in splits.items():
        if not utts:
            raise DataError(f"the {name} set is empty")
    if facts["corpus"].startswith("an4"):
        for utts in splits.values():
            for u in utts:
                an4.check_text(u.uid, u.text)
        vocab = AN4_VOCAB
    else:
        vocab = Vocab.from_texts([u.text for u in splits["train"]], data_cfg.unk)
    return Corpus(splits, vocab, facts, origins)


def _without_tokens(utts: list[an4.Utterance], tokens: list[str], split: str) -> list[an4.Utterance]:
    """``utts`` with the words in ``tokens`` removed from their transcripts; those left with no
    words are left out (CTC has nothing to align them to), and how many is said."""
    drop = set(tokens)
    kept, emptied = [], []
    for u in utts:
        text = " ".join(w for w in u.text.split() if w not in drop)
        (kept if text else emptied).append(dataclasses.replace(u, text=text))
    if emptied:
        warn(
            f"data.remove_tokens left {len(emptied)} of {len(utts)} utterance(s) of {split} with no words "
            f"(first: {emptied[0].uid!r}); they are left out"
        )
    return kept


def split_speakers(train: list[an4.Utterance], n_val: int) -> tuple[list[an4.Utterance], list[an4.Utterance]]:
    """Hold out ``n_val`` whole training speakers, chosen by a fixed RNG (the same for every run seed)."""
    speakers = sorted({u.speaker for u in train})
    if not 0 < n_val < len(speakers):
        raise DataError(
            f"data.val_speakers={n_val}, but the training set has {len(speakers)} speakers (and there is no "
            f"dev set); allowed: 1 to {len(speakers) - 1}, or a dev/ directory"
        )
    held = set(np.random.default_rng(0).choice(speakers, n_val, replace=False).tolist())
    return [u for u in train if u.speaker not in held], [u for u in train if u.speaker in held]


def prepare(
    data_cfg: Data, data_dir: str | None, out_length: Callable[[int], int] | None = None
) -> tuple[dict[str, list[Example]], dict[str, Any], Vocab]:
    """Features (deltas, training-set normalisation, frame stacking) and targets for
    train/val/test, the facts the model depends on (vocabulary, feature statistics) and the vocabulary.
    With ``data.fraction`` the training examples are those of a subset of the speakers; the
    statistics are still the whole training split's, so validation and test do not change."""
    corpus = load_corpus(data_cfg, data_dir)
    out_length = out_length or (lambda n: n)

    def raw(u: an4.Utterance) -> np.ndarray:
        return an4.add_deltas(u.feats) if data_cfg.deltas else u.feats

    feats_of = {name: [raw(u) for u in utts] for name, utts in corpus.splits.items()}
    norm = an4.Normalizer.fit(feats_of["train"])
    out = {}
    for name, utts in corpus.splits.items():
        normalised = normalise(utts, feats_of[name], data_cfg.cmvn, norm)
        examples = []
        for u, x in zip(utts, normalised):
            feats = torch.from_numpy(an4.stack_frames(x, data_cfg.stack).astype(np.float32))
            where = f"utterance {u.uid} ({corpus.origins[name]})"
            target = corpus.vocab.encode(u.text, where)
            repeats = int((target[1:] == target[:-1]).sum())
            if out_length(len(feats)) < len(target) + repeats:
                raise DataError(
                    f"{where}: {len(u.feats)} frames give the model {out_length(len(feats))} output frames, "
                    f"too few for its {len(target)} characters (CTC needs {len(target) + repeats}: one per "
                    "character, one more per repeated character)"
                )
            examples.append(Example(u.uid, feats, target, u.text))
        out[name] = examples
    regime = {}
    if data_cfg.fraction < 1:  # whole speakers; the statistics above are still the whole training split's
        speakers = [u.speaker for u in corpus.splits["train"]]
        keep = group_subset(speakers, data_cfg.fraction, data_cfg.seed)
        out["train"] = [out["train"][i] for i in keep]
        regime = {
            "utterances": len(keep),
            "of": len(speakers),
            "speakers": len({speakers[i] for i in keep}),
            "of_speakers": len(set(speakers)),
        }
    raw_dim = corpus.splits["train"][0].feats.shape[1]
    info = {
        "vocab": corpus.vocab.symbols,
        "unk": corpus.vocab.unk,
        "features": {
            **corpus.facts,
            "raw_dim": int(raw_dim),
            "deltas": data_cfg.deltas,
            "stack": data_cfg.stack,
            "dim": feature_dim(data_cfg, raw_dim),
            **(
                {"fbank": dataclasses.asdict(data_cfg.fbank)}
                if corpus.facts.get("source") == "wav.scp"
                else {}
            ),
        },
        # mean/variance normalisation: the mode, and the statistics of the training set (after
        # deltas, before stacking), which are what is applied when the mode is "global"
        "cmvn": {
            "mode": data_cfg.cmvn,
            "mean": [float(x) for x in norm.mean],
            "std": [float(x) for x in norm.std],
        },
        "utterances": {k: len(v) for k, v in out.items()},
        **({"regime": regime} if regime else {}),
    }
    return out, info, corpus.vocab


def normalise(
    utts: list[an4.Utterance], feats: list[np.ndarray], mode: str, train_norm: an4.Normalizer
) -> list[np.ndarray]:
    """Mean/variance normalised features of one split's utterances: with the training set's
    statistics (``global``), each speaker's own within this split (``speaker``), or each utterance's own."""
    if mode == "global":
        return [train_norm(x) for x in feats]
    key = (lambda u: u.speaker) if mode == "speaker" else (lambda u: u.uid)
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(utts):
        groups.setdefault(key(u), []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(feats)
    for members in groups.values():
        norm = an4.Normalizer.fit([feats[i] for i in members])
        for i in members:
            out[i] = norm(feats[i])
    return out


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded features (B, T, D), their lengths, concatenated targets, target lengths."""
    lengths = torch.tensor([len(e.feats) for e in examples])
    feats = nn.utils.rnn.pad_sequence([e.feats for e in examples], batch_first=True)
    return (
        feats,
        lengths,
        torch.cat([e.target for e in examples]),
        torch.tensor([len(e.target) for e in examples]),
    )


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


def spec_augment(
    feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugment, stack: int = 1
) -> torch.Tensor:
    """SpecAugment-style masking (no time warping): per utterance, ``freq_masks`` bands of up to
    ``freq_width`` feature dimensions and ``time_masks`` spans of up to ``time_width`` frames are
    set to 0 (the mean, as features are normalised). With ``stack`` frames stacked into one, a
    band covers the same dimensions of each stacked frame (and time spans count stacked frames).
    Draws from torch's global RNG, which the loop seeds per epoch, so runs stay reproducible and
    resumable."""
    if not (cfg.freq_masks and cfg.freq_width) and not (cfg.time_masks and cfg.time_width):
        return feats
    shape = feats.shape
    feats = feats.clone().view(shape[0], shape[1], stack, shape[2] // stack)  # (B, T, stacked frames, dims)
    dims = feats.shape[3]
    for b, n in enumerate(lengths.tolist()):
        for _ in range(cfg.freq_masks if cfg.freq_width else 0):
            w = int(torch.randint(0, cfg.freq_width + 1, ()).item())
            f0 = int(torch.randint(0, max(1, dims - w), ()).item())
            feats[b, :, :, f0 : f0 + w] = 0
        for _ in range(cfg.time_masks if cfg.time_width else 0):
            w = min(
                int(torch.randint(0, cfg.time_width + 1, ()).item()), n // 5
            )  # never more than a fifth of the utterance per mask
            t0 = int(torch.randint(0, max(1, n - w), ()).item())
            feats[b, t0 : t0 + w] = 0
    return feats.view(shape)
