"""asr-rnn's BLSTM layer (each direction on padded input) against torch's bidirectional LSTM on
packed sequences (the layer before 2026-12-03): one training step's forward and backward, side by side.

Usage:

    OMP_NUM_THREADS=2 python bench/blstm_speed.py [--reps 10]

The model is the `bench` preset's (3 layers of 256 cells per direction over 117 inputs: 13
cepstra with deltas, 3 frames stacked), on the first batches of AN4's training set that the
training loop would draw (16 utterances each, length-sorted within shuffled pools). Both sides
share the weights and the batches, and alternate step by step, so the machine's load falls on both
alike. Prints milliseconds per step and the ratio, and checks that both compute the same outputs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from topdown.tasks import resolve_config  # noqa: E402
from topdown.tasks.asr import data, rnn  # noqa: E402


def packed_forward(model: rnn.BLSTMCTC, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The encoder as it ran before: each layer's LSTM on a packed sequence."""
    x = feats
    for layer in model.encoder:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        x = nn.utils.rnn.pad_packed_sequence(
            layer.lstm(packed)[0], batch_first=True, total_length=x.shape[1]
        )[0]
    return model.output(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="steps timed per side (default 10)")
    args = parser.parse_args()
    cfg = resolve_config("asr-rnn", "bench", {"model": {"dropout": 0.0}}).task
    examples = data.prepare(cfg.data, None)[0]["train"]
    torch.manual_seed(0)
    model = rnn.build_model(cfg).train()
    # the training loop's own batches: length-sorted within shuffled pools, so little padding
    batches = list(
        itertools.islice(
            data.batches(examples, cfg.data.batch_size, torch.Generator().manual_seed(0)),
            args.reps + 1,
        )
    )
    batches = [(feats, lengths) for feats, lengths, _, _ in batches]
    feats, lengths = batches[0]
    with torch.no_grad():
        ours, reference = model(feats, lengths)[0], packed_forward(model, feats, lengths)
    valid = (torch.arange(feats.shape[1]) < lengths[:, None])[:, :, None]
    print(f"largest output difference on real frames: {((ours - reference) * valid).abs().max().item():.1e}")
    sides = {
        "padded, per direction (ours)": lambda f, n: model(f, n)[0],
        "packed, bidirectional (before)": lambda f, n: packed_forward(model, f, n),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i, (feats, lengths) in enumerate(batches):
        for name, forward in sides.items():
            start = time.perf_counter()
            forward(feats, lengths).square().mean().backward()
            if i:  # the first step of each side warms up
                times[name].append(time.perf_counter() - start)
            model.zero_grad()
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name}: {ms:.0f} ms a step (median of {args.reps})")
    before, ours = medians["packed, bidirectional (before)"], medians["padded, per direction (ours)"]
    print(
        f"ratio (packed / ours): {before / ours:.2f}x  (threads: {torch.get_num_threads()}, torch "
        f"{torch.__version__})"
    )


if __name__ == "__main__":
    main()
