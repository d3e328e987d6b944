"""topdown: top-down (classifier-first) cascade training of neural networks.

The method is model-agnostic. Drive a plan of stages from any training loop
(``topdown.Cascade(model, blocks, ...)``; see ``topdown.plan``), recorded in a run directory
(``out=``) or in memory, or describe the model and data as a ``Task`` and let our loop train
every stage (``topdown.cascade(task, out)``).
"""

from topdown.blocks import Blocks, ProposedBlocks, propose_blocks
from topdown.config import CascadeConfig, ProcedureConfig, RunConfig, TrainConfig
from topdown.errors import BlockError, ConfigError, DataError, TopdownError, TrainingError
from topdown.metrics import Metric
from topdown.optim import NTASGD
from topdown.plan import Plan
from topdown.procedures import (
    PLANS,
    Baseline,
    Cascade,
    Forgetting,
    LaterLayerForgetting,
    RetrainClassifier,
    TransferClassifier,
    plan_class,
    run_procedure,
    train_plan,
)
from topdown.resets import KelsSplit, Reinit, RescaleToInit, Reset, ShrinkPerturb
from topdown.schedules import KnowledgeEvolution, Layerwise, Restarts, ShrinkAndPerturb
from topdown.shortcuts import baseline, cascade, forget, forgetting, retrain_classifier, transfer_classifier
from topdown.stage import Accept, Stage, StageSpec
from topdown.task import Task
from topdown.tracking import Tracking
from topdown.version import __version__

__all__ = [
    "__version__",
    "Blocks",
    "propose_blocks",
    "ProposedBlocks",
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
    "Accept",
    "Baseline",
    "Cascade",
    "RetrainClassifier",
    "TransferClassifier",
    "Forgetting",
    "LaterLayerForgetting",
    "Layerwise",
    "KnowledgeEvolution",
    "Restarts",
    "ShrinkAndPerturb",
    "Reset",
    "Reinit",
    "ShrinkPerturb",
    "RescaleToInit",
    "KelsSplit",
    "PLANS",
    "plan_class",
    "baseline",
    "cascade",
    "retrain_classifier",
    "transfer_classifier",
    "forgetting",
    "forget",
    "run_procedure",
    "train_plan",
    "Tracking",
    "TopdownError",
    "BlockError",
    "ConfigError",
    "DataError",
    "TrainingError",
]
