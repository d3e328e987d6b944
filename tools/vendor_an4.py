"""Vendor the AN4 corpus into the package as one compact .npz plus its license and README.

Usage: python tools/vendor_an4.py /work/shared/data/an4 topdown/data/an4
"""

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from topdown.errors import DataError  # noqa: E402
from topdown.tasks.asr.an4 import load_bundle, load_sphinx, save_bundle  # noqa: E402


def main() -> int:
    """Read the Sphinx layout, write an4.npz, check it reads back identically, copy LICENSE/README."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="AN4 root (with etc/, feat/, LICENSE, README)")
    parser.add_argument("out", type=Path, help="output folder, e.g. topdown/data/an4")
    args = parser.parse_args()
    try:
        corpus = load_sphinx(args.src)
        args.out.mkdir(parents=True, exist_ok=True)
        bundle = args.out / "an4.npz"
        save_bundle(corpus, bundle)
        again = load_bundle(bundle)
        for split, utts in corpus.items():
            for a, b in zip(utts, again[split], strict=True):
                if (a.uid, a.speaker, a.text) != (
                    b.uid,
                    b.speaker,
                    b.text,
                ) or a.feats.tobytes() != b.feats.tobytes():
                    raise DataError(f"{bundle}: round trip differs at {a.uid}")
        for name in ("LICENSE", "README"):
            if not (args.src / name).is_file():
                raise DataError(f"{args.src / name}: not found (the license must travel with the data)")
            shutil.copyfile(args.src / name, args.out / name)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, utts in corpus.items():
        frames = sum(len(u.feats) for u in utts)
        print(f"{split}: {len(utts)} utterances, {len({u.speaker for u in utts})} speakers, {frames} frames")
    print(f"wrote {bundle} ({bundle.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
