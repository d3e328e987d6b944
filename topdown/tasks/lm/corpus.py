"""WikiText-style corpora: the bundled WT2-small benchmark and the standard WikiText-2 layout.

A corpus is three lists of lines; each line is split on whitespace and ends with ``<eos>``
(the usual WikiText convention, blank lines included). The vocabulary is built from the
training split in order of first appearance; a word unseen in training maps to ``<unk>``
when the training split has it, otherwise it is a :class:`~topdown.errors.DataError`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from topdown.errors import DataError
from topdown.task import text_lines

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "wikitext2"
EOS, UNK = "<eos>", "<unk>"
SPLITS = ("train", "val", "test")
_HEADING = re.compile(r"^ = [^=].* = $")  # a top-level article title; sections are " = = ... = = "
NOT_COMPARABLE = (
    "WT2-small (train on WikiText-2's validation split, validate and test on the two halves of its test "
    "split): these perplexities are NOT comparable with published WikiText-2 perplexities."
)


def split_at_middle_article(lines: list[str]) -> tuple[list[str], list[str]]:
    """Split at the article heading nearest the middle by token count (the heading starts the second half)."""
    tokens, counts = 0, []
    for line in lines:
        counts.append(tokens)
        tokens += len(line.split()) + 1
    heads = [i for i, line in enumerate(lines) if _HEADING.match(line) and i > 0]
    if not heads:
        raise DataError(
            "cannot split the test file: it has no article heading (a line ' = Title = ') after its first "
            "line"
        )
    cut = min(heads, key=lambda i: abs(counts[i] - tokens / 2))
    return lines[:cut], lines[cut:]


@functools.lru_cache(maxsize=2)
def load_wt2_small(root: Path = BUNDLED) -> dict[str, list[str]]:
    """WT2-small: train on WikiText-2's valid.txt; validation and test are the halves of test.txt.
    (Cached: the same lists are returned on every call, do not modify them.)"""
    val, test = split_at_middle_article(text_lines(root / "test.txt.gz"))
    return {"train": text_lines(root / "valid.txt.gz"), "val": val, "test": test}


def standard_paths(data_dir: str | Path) -> dict[str, Path]:
    """The split files of a full corpus: ``wiki.{train,valid,test}.tokens`` or
    ``{train,valid,test}.txt`` in ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: not a directory")
    for pattern in ("wiki.{}.tokens", "{}.txt"):
        paths = {
            split: root / pattern.format(name) for split, name in zip(SPLITS, ("train", "valid", "test"))
        }
        if any(p.is_file() for p in paths.values()):
            missing = [p.name for p in paths.values() if not p.is_file()]
            if missing:
                raise DataError(f"--data-dir {root}: missing {', '.join(missing)}")
            return paths
    raise DataError(
        f"--data-dir {root}: expected wiki.{{train,valid,test}}.tokens or {{train,valid,test}}.txt"
    )


def load_standard(paths: Mapping[str, Path]) -> dict[str, list[str]]:
    """A full corpus's lines per split, from the files :func:`standard_paths` found."""
    return {split: text_lines(p) for split, p in paths.items()}


def describe(split: str, path: Path | None = None) -> str:
    """A split as error messages name it: with its file, where it has one of its own."""
    return f"the {split} split" + (f" ({path})" if path is not None else "")


def build_vocab(lines: list[str]) -> list[str]:
    """Words of the training split in order of first appearance (``<eos>`` included)."""
    seen: dict[str, None] = {}
    for line in lines:
        for word in line.split():
            seen.setdefault(word, None)
        seen.setdefault(EOS, None)
    return list(seen)


def encode(lines: list[str], vocab: list[str], split: str, path: Path | None = None) -> torch.Tensor:
    """Token ids of a split as one long stream; unseen words become ``<unk>`` or a DataError
    (errors name ``path``, the split's file, when given)."""
    if not any(line.split() for line in lines):
        raise DataError(f"{describe(split, path)} is empty (no words)")
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get(UNK)
    ids: list[int] = []
    for number, line in enumerate(lines, 1):
        for word in line.split():
            i = index.get(word, unk)
            if i is None:
                raise DataError(
                    f"{describe(split, path)}, line {number}: word {word!r} is not in the training "
                    f"vocabulary and the corpus has no {UNK}"
                )
            ids.append(i)
        ids.append(index[EOS])
    return torch.tensor(ids, dtype=torch.long)


def batchify(
    ids: torch.Tensor,
    batch_size: int,
    what: str = "the token stream",
    key: str = "the batch size",
    fix: str = "",
) -> torch.Tensor:
    """(T, B): ``batch_size`` contiguous streams side by side; the remainder is dropped. Too short
    a stream is an error naming ``what`` it is, the option ``key`` that sets the batch size, and
    any other ``fix``: a bare "too few tokens" leaves the user guessing which split and option."""
    steps = len(ids) // batch_size
    if steps < 2:
        raise DataError(
            f"{what} has {len(ids)} tokens, too few for {key} {batch_size} "
            f"(at least {2 * batch_size}: 2 per stream); lower {key}{fix}"
        )
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()
