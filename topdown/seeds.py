"""Seeds: every random draw of a run is a pure function of the run seed and where it happens."""

from __future__ import annotations

import numpy as np

from topdown.errors import ConfigError


def check_seed(seed: object) -> int:
    """A run seed, or a ConfigError: seeds are non-negative integers."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"the seed must be a non-negative integer, got {seed!r}")
    return seed


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (run seed, stage, candidate, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)
