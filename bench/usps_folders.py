"""Convert the USPS handwritten digits (Hull, 1994: 7,291 training and 2,007 test images of 16x16
grey levels, scanned from envelopes of the US Postal Service) into the image-folder layout the
``image`` task reads with ``--data-dir``: ``OUT/train/<digit>/NNNNN.png`` and
``OUT/test/<digit>/NNNNN.png``, 8-bit grayscale. No ``val/`` is written: the task holds out a fixed
share of ``train/`` for validation, so the test images are never used to choose anything.

Two published forms of the corpus are read, and give the same images:
- ``zip.train.gz`` and ``zip.test.gz``, the text files of Hastie, Tibshirani and Friedman's "The
  Elements of Statistical Learning" data sets (one image a line: the digit, then 256 grey levels in
  [-1, 1], row by row);
- ``usps.h5``, the HDF5 copy common in public repositories (``train/data``, ``train/target``,
  ``test/data``, ``test/target``; grey levels in [0, 1]); reading it needs ``pip install h5py``.
Grey level v in [-1, 1] becomes (v + 1) / 2 * 255, v in [0, 1] becomes v * 255, rounded half up: the
text's three decimals put many levels exactly half-way, where the two forms' float noise would
otherwise round apart.

    python bench/usps_folders.py --gz zip.train.gz zip.test.gz --out ~/data/usps
    python bench/usps_folders.py --h5 usps.h5 --out ~/data/usps
    topdown compare image --data-dir ~/data/usps ...

Nothing is downloaded: obtain the files first (bench/README.md says where they are published).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

SIDE = 16
SIZES = {"train": 7291, "test": 2007}  # the published split; a file of another size is refused
TIE = 1e-4  # above both forms' float error (about 1e-5 at this scale), far below a grey level's step


def read_gz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(grey levels in [0, 1] as float64, N x 256; digits, N) from one ElemStatLearn text file."""
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, ndmin=2)
    if rows.shape[1] != 1 + SIDE * SIDE:
        raise SystemExit(
            f"{path}: expected 257 numbers a line (the digit, then 16x16 grey levels), got {rows.shape[1]}"
        )
    return (rows[:, 1:] + 1) / 2, rows[:, 0].astype(np.int64)


def read_h5(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        import h5py
    except ImportError:
        raise SystemExit(
            "reading usps.h5 needs h5py: pip install h5py (or convert the zip.*.gz files)"
        ) from None
    with h5py.File(path, "r") as f:
        return {
            s: (f[f"{s}/data"][:].astype(np.float64), f[f"{s}/target"][:].astype(np.int64)) for s in SIZES
        }


def write_split(out: Path, split: str, grey: np.ndarray, digits: np.ndarray) -> None:
    from PIL import Image

    if len(digits) != SIZES[split] or grey.shape[1] != SIDE * SIDE:
        raise SystemExit(f"{split}: expected {SIZES[split]} images of 256 pixels, got {grey.shape}")
    if grey.min() < 0 or grey.max() > 1 or not set(np.unique(digits)) <= set(range(10)):
        raise SystemExit(f"{split}: grey levels or digits out of range; is this the USPS corpus?")
    pixels = np.floor(grey * 255 + 0.5 + TIE).astype(np.uint8).reshape(-1, SIDE, SIDE)
    for d in range(10):
        (out / split / str(d)).mkdir(parents=True, exist_ok=True)
    for i, (image, digit) in enumerate(zip(pixels, digits)):
        Image.fromarray(image, mode="L").save(out / split / str(digit) / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--gz", nargs=2, type=Path, metavar=("TRAIN", "TEST"), help="zip.train.gz zip.test.gz"
    )
    source.add_argument("--h5", type=Path, metavar="FILE", help="usps.h5")
    parser.add_argument("--out", type=Path, required=True, help="an image-folder corpus is written here")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: choose a new directory")
    splits = read_h5(args.h5) if args.h5 else {s: read_gz(p) for s, p in zip(SIZES, args.gz)}
    for split, (grey, digits) in splits.items():
        write_split(args.out, split, grey, digits)
        counts = np.bincount(digits, minlength=10)
        print(f"{split}: {len(digits)} images, per digit {counts.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
