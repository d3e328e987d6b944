"""Build a few-speaker ASR corpus from the bundled AN4 cepstra, as Kaldi data directories.

Usage: python tools/make_small_corpus.py OUT [--train-speakers 6] [--dev-speakers 2]
                                            [--test-speakers 3] [--seed 0]

A stand-in for "a user's own small corpus": a handful of speakers, the same small vocabulary,
read by `--data-dir OUT` as `feats.scp` directories. Training and development speakers are
drawn (disjoint, by `--seed`) from AN4's training speakers; test speakers from AN4's test
speakers, so no test voice is ever trained or validated on. Writes OUT/{train,dev,test}/
feats.ark, feats.scp, text and utt2spk, and OUT/README with what was drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from topdown.tasks.asr.an4 import Utterance, bundled_path, load_bundle  # noqa: E402


def by_speaker(utts: list[Utterance]) -> dict[str, list[Utterance]]:
    out: dict[str, list[Utterance]] = {}
    for u in utts:
        out.setdefault(u.speaker, []).append(u)
    return out


def write_dir(path: Path, utts: list[Utterance]) -> None:
    import kaldiio

    path.mkdir(parents=True, exist_ok=True)
    kaldiio.save_ark(str(path / "feats.ark"), {u.uid: u.feats for u in utts}, scp=str(path / "feats.scp"))
    (path / "text").write_text("".join(f"{u.uid} {u.text}\n" for u in utts))
    (path / "utt2spk").write_text("".join(f"{u.uid} {u.speaker}\n" for u in utts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-speakers", type=int, default=6)
    parser.add_argument("--dev-speakers", type=int, default=2)
    parser.add_argument("--test-speakers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    corpus = load_bundle(bundled_path())
    train_pool, test_pool = by_speaker(corpus["train"]), by_speaker(corpus["test"])
    if args.train_speakers + args.dev_speakers > len(train_pool) or args.test_speakers > len(test_pool):
        print(
            f"make_small_corpus: AN4 has {len(train_pool)} training and {len(test_pool)} test speakers",
            file=sys.stderr,
        )
        return 1
    rng = np.random.default_rng(args.seed)
    drawn = [str(s) for s in rng.permutation(sorted(train_pool))]
    tested = [str(s) for s in rng.permutation(sorted(test_pool))[: args.test_speakers]]
    splits = {
        "train": drawn[: args.train_speakers],
        "dev": drawn[args.train_speakers : args.train_speakers + args.dev_speakers],
        "test": tested,
    }
    lines = [
        "Few-speaker corpus drawn from the bundled AN4 cepstra by tools/make_small_corpus.py"
        f" (seed {args.seed})."
    ]
    for split, speakers in splits.items():
        pool = test_pool if split == "test" else train_pool
        utts = [u for s in speakers for u in pool[s]]
        write_dir(args.out / split, utts)
        lines.append(f"{split}: {len(utts)} utterances, speakers {', '.join(speakers)}")
    (args.out / "README").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
