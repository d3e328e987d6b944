"""Run an example script as one rank of a data-parallel job, each rank saving its model after every
stage it finished (``stage-<i>-rank-<r>.pt``) and the model the plan chose (``chosen-rank-<r>.pt``)
for the test to compare; ``--kill R:S``: rank R kills itself (SIGKILL) once it has finished stage S,
as a rank that dies.

    torchrun --nproc_per_node=2 tests/jobs/ranks.py DUMPS [--kill R:S] SCRIPT ARGS...
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

import topdown
from topdown import distributed


def dump_stages(dumps: Path, kill: tuple[int, int] | None = None) -> None:
    """Make ``Stage.finish``, and the plan's end, save each rank's model into ``dumps``."""
    finish, complete = topdown.Stage.finish, topdown.Plan._complete

    def finish_and_dump(stage, *args, **kwargs):
        record = finish(stage, *args, **kwargs)
        torch.save(stage.model.state_dict(), dumps / f"stage-{stage.index}-rank-{distributed.rank()}.pt")
        if kill == (distributed.rank(), stage.index):
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    def complete_and_dump(plan):
        complete(plan)
        torch.save(plan.model.state_dict(), dumps / f"chosen-rank-{distributed.rank()}.pt")

    dumps.mkdir(parents=True, exist_ok=True)
    topdown.Stage.finish, topdown.Plan._complete = finish_and_dump, complete_and_dump


if __name__ == "__main__":
    dumps, rest = Path(sys.argv[1]), sys.argv[2:]
    kill = None
    if rest[0] == "--kill":
        kill, rest = tuple(int(n) for n in rest[1].split(":")), rest[2:]
    dump_stages(dumps, kill)
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")
