"""Errors the command line reports as one line (and a non-zero exit) instead of a traceback.
What is said without stopping (warnings, progress) is ``console.py``'s."""


class TopdownError(Exception):
    """Base class: anything the user can fix (bad input, bad config, a diverged stage)."""


class DataError(TopdownError):
    """A corpus or data file is missing, corrupt or inconsistent."""


class ConfigError(TopdownError):
    """A configuration key or value does not fit the task or the model."""


class BlockError(TopdownError):
    """The declared blocks do not partition the model's parameters."""


class TrainingError(TopdownError):
    """A stage could not be trained (for example its loss became NaN)."""
