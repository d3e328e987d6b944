"""Pack the finished runs of a directory into a results directory's ``runs.tar.xz``: each run's
``summary.json``, per-epoch ``metrics.jsonl`` and other text records, never a checkpoint
(``topdown.archive.pack_runs``). A run already in the archive is replaced, every other one kept;
the same files give the same bytes, so packing again changes nothing in git that did not change.

    python bench/pack_runs.py FROM ARCHIVE [--prefix runs/]

``--prefix runs/`` for a comparison (``FROM`` is its ``DIR/runs``; ``topdown compare --runs-from
ARCHIVE`` restores it); none for a directory of single runs such as an ablation's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from topdown.archive import pack_runs
from topdown.errors import TopdownError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a directory of run directories")
    parser.add_argument("archive", type=Path, help="the runs.tar.xz to write (added to, if it exists)")
    parser.add_argument("--prefix", default="", help="members are PREFIX + RUN/FILE (runs/ for a comparison)")
    args = parser.parse_args()
    try:
        packed = pack_runs(args.source, args.archive, args.prefix)
    except TopdownError as e:
        sys.exit(f"pack_runs.py: {e}")
    print(f"packed {len(packed)} finished runs of {args.source} into {args.archive}")


if __name__ == "__main__":
    main()
