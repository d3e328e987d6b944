"""Whether a run's stages are as bad as validation said, or only their BatchNorm statistics are stale.

Usage:

    OMP_NUM_THREADS=1 python bench/bn_statistics.py RUN [--split val] [--data-dir DIR]

For each stage checkpoint of the run directory RUN (``checkpoints/stage-K.safetensors``), the task's
metric on ``--split`` twice: as validation measured it (BatchNorm normalising by its running
statistics) and with every BatchNorm normalising by the statistics of the evaluation batch itself.
A stage whose two numbers are far apart was judged on statistics its weights had left behind: a
reset that rescales weights (shrink and perturb) restarts them from a fresh model's, and a few
steps of training do not move their running averages far enough (docs/schedules.md). The task, its
configuration and its data come from the run's ``summary.json`` (``--data-dir`` where the data moved).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from topdown.errors import TopdownError
from topdown.loop import evaluate
from topdown.tasks import make_task, resolve_config


def with_batch_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in evaluation mode but for its BatchNorm layers, which normalise by each
    batch's own statistics (the copy's running averages absorb them; the model's stay as they were)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with its checkpoints")
    parser.add_argument("--split", default="val", help="the split evaluated (default: val)")
    parser.add_argument("--data-dir", help="the task's data (default: the one the run recorded)")
    args = parser.parse_args()
    try:
        summary = json.loads((args.run / "summary.json").read_text())
        config = resolve_config(summary["task"], summary["preset"], summary["config"])
        data_dir = args.data_dir or summary.get("task_info", {}).get("data_dir")
        task = make_task(summary["task"], config.task, data_dir)
    except (OSError, KeyError, json.JSONDecodeError, TopdownError) as e:
        sys.exit(f"bn_statistics: {args.run}: not a readable run ({e})")
    metric = task.primary.name
    measured = f"{args.split} {metric}"
    print(f"| stage | role | {measured}, running statistics | {measured}, batch statistics |")
    print("|---|---|---|---|")
    model = task.build_model()
    for stage in summary["stages"]:
        path = args.run / "checkpoints" / f"stage-{stage['index']}.safetensors"
        if not path.is_file():
            continue
        model.load_state_dict(load_file(path))
        running = evaluate(model, task, args.split)[metric]  # as the training loop validates
        with torch.no_grad():  # not the loop's evaluate: it would put BatchNorm back in eval mode
            batch = task.evaluate(with_batch_statistics(model), args.split)[metric]
        print(f"| {stage['index']} | {stage['role']} | {running:.4f} | {batch:.4f} |")


if __name__ == "__main__":
    main()
