"""CTC decoding and scoring for the ASR tasks: the ``decode`` options, greedy (best-path)
decoding, prefix beam search with optional shallow fusion of a word n-gram LM, and corpus WER/CER."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import editdistance
import numpy as np
import torch

from topdown.errors import ConfigError, DataError
from topdown.sections import Section, option
from topdown.tasks.asr.data import AN4_VOCAB, BLANK, Example, Vocab
from topdown.tasks.asr.ngram import END, WordNgram


@dataclass(frozen=True)
class Decode(Section):
    SECTION: ClassVar[str] = "decode"
    beam: int = option(
        8, ge=0
    )  # CTC prefix beam search width for wer_beam/cer_beam next to greedy wer/cer; 0 = greedy only
    on_val: bool = (
        False  # also beam-decode every validation pass (slower); test is always beam-decoded when beam > 0
    )
    prune: float = option(
        10.0, gt=0
    )  # per frame, extend prefixes only by symbols within this many nats of the frame's best
    # A word n-gram LM trained on the training transcripts, fused into a second beam search whose
    # wer_lm/cer_lm are reported next to greedy and plain beam (never instead of them); 0 = none.
    lm_order: int = option(0, ge=0)
    lm_weight: float = option(
        0.5, ge=0
    )  # LM log-probability weight; choose it on validation (decode.on_val=true)
    word_bonus: float = option(
        3.0
    )  # added per word, against the LM's preference for fewer words (3.0 and lm_weight 0.5: AN4 validation)
    oov_penalty: float = option(
        0.0, ge=0
    )  # subtracted once per word outside the training transcripts' words (the lexicon)

    def check_relations(self) -> None:
        if self.lm_order and not self.beam:
            raise ConfigError("decode.lm_order needs the beam search: set decode.beam > 0")


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, vocab: Vocab = AN4_VOCAB) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best = logits.argmax(-1).cpu()
    return [
        vocab.decode(torch.unique_consecutive(seq[:n]).tolist()) for seq, n in zip(best, lengths.tolist())
    ]


def _logadd(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


@dataclass(frozen=True)
class WordScorer:
    """Shallow fusion of a word language model into the beam search (Hannun et al. 2014):
    a prefix's score is its CTC log-probability plus ``weight`` times the LM log-probability
    of its words plus ``bonus`` per word, a word being scored when the space after it (or
    the end of the utterance) completes it. ``oov_penalty`` is charged once per word outside
    the LM's lexicon, as soon as its spelling leaves every lexicon word: charged then rather
    than at the word's end, a misspelling loses its place in the beam while the right spelling
    can still take it (a large penalty keeps the search within the lexicon)."""

    lm: WordNgram
    symbols: list[str]  # symbol id -> character
    space: int  # the id of the word separator
    weight: float
    bonus: float
    oov_penalty: float = 0.0

    def extend(self, state: tuple[tuple[str, ...], str, float], s: int) -> tuple[tuple[str, ...], str, float]:
        """(words so far, the word being spelled, LM score) after symbol ``s``."""
        words, partial, score = state
        if s != self.space:
            longer = partial + self.symbols[s]
            left_lexicon = self.oov_penalty and partial in self.lm.prefixes and longer not in self.lm.prefixes
            return words, longer, score - self.oov_penalty if left_lexicon else score
        if not partial:
            return state
        if (
            self.oov_penalty and partial in self.lm.prefixes and partial not in self.lm.words
        ):  # a lexicon word's beginning only
            score -= self.oov_penalty
        return (*words, partial), "", score + self.weight * self.lm.logprob(words, partial) + self.bonus

    def final(self, state: tuple[tuple[str, ...], str, float]) -> float:
        """The LM score of a finished utterance: its last word and the end of the sentence."""
        words, partial, score = self.extend(state, self.space)
        return score + self.weight * self.lm.logprob(words, END)


def prefix_beam_search(
    log_probs: np.ndarray,
    beam: int,
    prune: float = 10.0,
    blank: int = BLANK,
    scorer: WordScorer | None = None,
) -> list[int]:
    """CTC prefix beam search over one utterance's (frames, symbols) log-probabilities.

    Each hypothesis is a label prefix with two scores: the log-probability of all paths
    that produce it and end in a blank, and of those that end in its last symbol. A frame
    extends every kept prefix by blank (same prefix), by its last symbol (same prefix, via
    the non-blank ending) or by any symbol (a longer prefix; a repeat of the last symbol
    only via the blank ending), merging paths that give the same prefix; the ``beam`` best
    prefixes survive. Symbols more than ``prune`` nats below a frame's best are not tried.
    With a ``scorer``, prefixes are ranked by CTC plus word-LM score. Returns the best
    prefix's symbol ids.
    """
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    neg = -math.inf
    hyps: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg)}
    lm_state: dict[tuple[int, ...], tuple[tuple[str, ...], str, float]] = {(): ((), "", 0.0)}
    for row in log_probs:
        row = row.tolist()
        top = max(row)
        symbols = [s for s, p in enumerate(row) if p >= top - prune]
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in hyps.items():
            total = _logadd(pb, pnb)
            last = prefix[-1] if prefix else None
            for s in symbols:
                p = row[s]
                if s == blank:
                    e = nxt.setdefault(prefix, [neg, neg])
                    e[0] = _logadd(e[0], total + p)
                    continue
                if s == last:
                    e = nxt.setdefault(prefix, [neg, neg])  # "aa" collapses to "a"
                    e[1] = _logadd(e[1], pnb + p)
                longer = prefix + (s,)
                e = nxt.setdefault(longer, [neg, neg])
                e[1] = _logadd(
                    e[1], (pb if s == last else total) + p
                )  # a repeat is a new symbol only after a blank
                if scorer is not None and longer not in lm_state:
                    lm_state[longer] = scorer.extend(lm_state[prefix], s)
        rank = (
            (lambda kv: _logadd(*kv[1]))
            if scorer is None
            else (lambda kv: _logadd(*kv[1]) + lm_state[kv[0]][2])
        )
        hyps = {k: (v[0], v[1]) for k, v in sorted(nxt.items(), key=rank, reverse=True)[:beam]}
        if scorer is not None:
            lm_state = {k: lm_state[k] for k in hyps}
    if scorer is None:
        return list(max(hyps.items(), key=lambda kv: _logadd(*kv[1]))[0])
    return list(max(hyps.items(), key=lambda kv: _logadd(*kv[1]) + scorer.final(lm_state[kv[0]]))[0])


def beam_decode(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    vocab: Vocab,
    beam: int,
    prune: float = 10.0,
    scorer: WordScorer | None = None,
) -> list[str]:
    log_probs = logits.float().log_softmax(-1).cpu().numpy()
    return [
        vocab.decode(prefix_beam_search(lp[:n], beam, prune, scorer=scorer))
        for lp, n in zip(log_probs, lengths.tolist())
    ]


def transcribe(
    outputs: list[tuple], vocab: Vocab, beam: int = 0, prune: float = 10.0, scorer: WordScorer | None = None
) -> list[str]:
    """Hypotheses for ``forward_split``'s outputs: greedy (``beam`` 0) or prefix beam search (with
    a word LM when ``scorer`` is given)."""
    if not beam:
        return [h for logits, lengths in outputs for h in greedy_decode(logits, lengths, vocab)]
    return [
        h for logits, lengths in outputs for h in beam_decode(logits, lengths, vocab, beam, prune, scorer)
    ]


def error_rates(hyps: list[str], refs: list[str], suffix: str = "") -> dict[str, float]:
    """Corpus-level WER and CER (edit distance summed over utterances / reference length), named
    ``wer{suffix}`` and ``cer{suffix}`` (``_beam``, ``_lm``: the decoder that made ``hyps``). Both
    compare the words: CER over the words joined by single spaces, so a space a decoder leaves at an
    utterance's edge, or twice between words, is not a character error (WER never saw it)."""
    hyp_words, ref_words = [h.split() for h in hyps], [r.split() for r in refs]
    hyp_chars, ref_chars = [" ".join(w) for w in hyp_words], [" ".join(w) for w in ref_words]
    word_errors = sum(editdistance.eval(h, r) for h, r in zip(hyp_words, ref_words))
    char_errors = sum(editdistance.eval(h, r) for h, r in zip(hyp_chars, ref_chars))
    return {
        f"wer{suffix}": word_errors / max(1, sum(map(len, ref_words))),
        f"cer{suffix}": char_errors / max(1, sum(map(len, ref_chars))),
    }


def word_scorer(
    train: list[Example], vocab: Vocab, order: int, weight: float, bonus: float, oov_penalty: float = 0.0
) -> WordScorer:
    """Shallow fusion of a word ``order``-gram trained on the training transcripts (its lexicon:
    their words)."""
    if " " not in vocab.index:
        raise DataError("decode.lm_order: the training transcripts hold no spaces, so no words for a word LM")
    return WordScorer(
        WordNgram([e.text for e in train], order=order),
        vocab.symbols,
        vocab.index[" "],
        weight,
        bonus,
        oov_penalty,
    )
