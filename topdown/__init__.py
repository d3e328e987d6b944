"""topdown: top-down (classifier-first) cascade training of neural networks.

The method is model-agnostic. Drive a plan of stages from any training loop
(``topdown.Cascade(model, blocks, ...)``; see ``topdown.plan``), or describe the model and
data as a ``Task`` and let our loop train every stage (``topdown.cascade(task, out)``).
"""

from topdown.blocks import Blocks
from topdown.config import CascadeConfig, ProcedureConfig, RunConfig, TrainConfig
from topdown.errors import BlockError, ConfigError, DataError, TopdownError, TrainingError
from topdown.metrics import Metric
from topdown.optim import NTASGD
from topdown.plan import Plan, Stage, StageSpec
from topdown.procedures import (
    Baseline,
    Cascade,
    LaterLayerForgetting,
    RetrainClassifier,
    TransferClassifier,
    baseline,
    cascade,
    forget,
    retrain_classifier,
    run_procedure,
    train_plan,
    transfer_classifier,
)
from topdown.task import Task

__all__ = [
    "Blocks",
    "Task",
    "TrainConfig",
    "CascadeConfig",
    "ProcedureConfig",
    "RunConfig",
    "Metric",
    "NTASGD",
    "Plan",
    "Stage",
    "StageSpec",
    "Baseline",
    "Cascade",
    "RetrainClassifier",
    "TransferClassifier",
    "LaterLayerForgetting",
    "baseline",
    "cascade",
    "retrain_classifier",
    "transfer_classifier",
    "forget",
    "run_procedure",
    "train_plan",
    "TopdownError",
    "BlockError",
    "ConfigError",
    "DataError",
    "TrainingError",
]
__version__ = "0.1.0"
