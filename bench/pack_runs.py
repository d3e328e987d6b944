"""Pack the finished runs of a directory into a results directory's ``runs.tar.xz``: each run's
``summary.json``, per-epoch ``metrics.jsonl`` and other text records, never a checkpoint
(``topdown.archive.pack_runs``). A run already in the archive is replaced, every other one kept;
the same files give the same bytes, so packing again changes nothing in git that did not change.

    python bench/pack_runs.py FROM ARCHIVE [--prefix runs/]

``--prefix runs/`` for a comparison (``FROM`` is its ``DIR/runs``; ``topdown compare --runs-from
ARCHIVE`` restores it); none for a directory of single runs such as an ablation's. ``FROM`` a sweep's
``DIR`` (it has ``cells/``) packs every cell's runs as ``cells/CELL/runs/RUN/FILE``
(``topdown.archive.pack_sweep``; ``topdown sweep --runs-from ARCHIVE`` restores them), no prefix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from topdown.archive import pack_runs, pack_sweep
from topdown.errors import TopdownError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a directory of run directories, or a sweep's directory")
    parser.add_argument("archive", type=Path, help="the runs.tar.xz to write (added to, if it exists)")
    parser.add_argument("--prefix", default="", help="members are PREFIX + RUN/FILE (runs/ for a comparison)")
    args = parser.parse_args()
    try:
        if (args.source / "cells").is_dir():
            if args.prefix:
                sys.exit("pack_runs.py: a sweep's runs are packed as cells/CELL/runs/RUN/FILE; no --prefix")
            packed = pack_sweep(args.source, args.archive)
        else:
            packed = pack_runs(args.source, args.archive, args.prefix)
    except TopdownError as e:
        sys.exit(f"pack_runs.py: {e}")
    print(f"packed {len(packed)} finished runs of {args.source} into {args.archive}")


if __name__ == "__main__":
    main()
