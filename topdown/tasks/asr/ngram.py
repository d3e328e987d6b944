"""A word n-gram language model for CTC beam search, trained on the training transcripts.

Interpolated absolute discounting (Ney, Essen and Kneser 1994): each order's discounted
relative frequency, plus the discounted mass spread by the next lower order, down to a
uniform distribution over the training words and one unknown word. It is trained on the
training split's transcripts only (never validation or test), so it is small, needs no
external toolkit, and its numbers stay honest; a user with a large text corpus would use an
ARPA model from KenLM instead.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

START, END = "<s>", "</s>"


class WordNgram:
    def __init__(self, sentences: list[str], order: int = 3, discount: float = 0.75):
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order, self.discount = order, discount
        self.counts: list[dict[tuple[str, ...], Counter]] = [defaultdict(Counter) for _ in range(order)]
        words = set()
        for sentence in sentences:
            tokens = [START] * (order - 1) + [*sentence.split(), END]
            words.update(tokens[order - 1 :])
            for i in range(order - 1, len(tokens)):
                for k in range(order):  # k words of context
                    self.counts[k][tuple(tokens[i - k : i])][tokens[i]] += 1
        self.uniform = 1.0 / (len(words) + 1)  # + 1: one unknown word
        self.words = frozenset(words - {END})  # the lexicon: every word of the training transcripts
        self.prefixes = frozenset(w[:i] for w in self.words for i in range(len(w) + 1))
        self.totals = [{ctx: (sum(c.values()), len(c)) for ctx, c in level.items()} for level in self.counts]
        self._cache: dict[tuple[tuple[str, ...], str], float] = {}

    def logprob(self, history: tuple[str, ...], word: str) -> float:
        """Natural log of P(word | the last order - 1 words of history); a history shorter than
        that is the start of a sentence."""
        n = self.order - 1
        context = ((START,) * n + tuple(history))[len(history) :] if n else ()
        key = (context, word)
        if key not in self._cache:
            p = self.uniform
            for k in range(self.order):
                ctx = context[n - k :] if k else ()
                if ctx not in self.totals[k]:
                    break  # an unseen context: no higher order has seen it either
                total, types = self.totals[k][ctx]
                p = (
                    max(self.counts[k][ctx][word] - self.discount, 0.0) / total
                    + self.discount * types / total * p
                )
            self._cache[key] = math.log(p)
        return self._cache[key]
