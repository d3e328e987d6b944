"""``python -m topdown`` is the ``topdown`` command (so ``torchrun -m topdown`` works too)."""

import sys

from topdown.cli import main

if __name__ == "__main__":
    sys.exit(main())
