"""topdown: top-down (classifier-first) cascade training of neural networks.

The method is model-agnostic: describe your model as ordered ``Blocks`` inside a ``Task``
(a few plain callables) and call one of the procedures.
"""

from .blocks import Blocks
from .config import CascadeConfig, TrainConfig
from .errors import BlockError, ConfigError, DataError, TopdownError, TrainingError
from .procedures import baseline, cascade, retrain_classifier, run_procedure, transfer_classifier
from .task import Task

__all__ = [
    "Blocks", "Task", "TrainConfig", "CascadeConfig",
    "baseline", "cascade", "retrain_classifier", "transfer_classifier", "run_procedure",
    "TopdownError", "BlockError", "ConfigError", "DataError", "TrainingError",
]
__version__ = "0.1.0"
