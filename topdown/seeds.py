"""Seeds: every random draw of a run is a pure function of the run seed and where it happens."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (run seed, stage, candidate, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)
