"""``fit_plan`` with ``devices=N, strategy="ddp"`` on CPU (gloo), as a user's script: Lightning starts
the other ranks by running this script again, each building the plan before the process group
exists. Each rank saves its model after every stage and at the end, for the test to compare.

    python lightning_ddp.py RUN DUMPS DEVICES [--resume]
"""

import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.ranks import dump_stages  # noqa: E402
from test_lightning import loaders, new_plan  # noqa: E402

from topdown.adapters.lightning import fit_plan  # noqa: E402

run, dumps, devices, resume = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), "--resume" in sys.argv
dump_stages(dumps)
fit_plan(
    new_plan(run, resume=resume),
    lambda stage: L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ),
    monitor="val_error",
    **loaders(),
)
