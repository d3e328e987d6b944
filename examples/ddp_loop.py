"""A top-down cascade trained by a data-parallel loop of your own: torchrun starts the processes,
each joins the process group, and every stage's model is wrapped in ``DistributedDataParallel``
(docs/trainers.md). Only rank 0 writes the run; every rank gets rank 0's decisions and weights.

    torchrun --nproc_per_node=2 examples/ddp_loop.py --out runs/ddp
    torchrun --nproc_per_node=2 examples/ddp_loop.py --out runs/ddp --resume   # after an interruption
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import topdown

BLOCKS = [("hidden1", ["hidden1"]), ("hidden2", ["hidden2"]), ("output", ["output"])]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden1 = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.hidden2 = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.output = nn.Linear(32, 3)

    def forward(self, x):
        return self.output(self.hidden2(self.hidden1(x)))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    return x, (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long()


@torch.no_grad()
def error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) != y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")  # torchrun's environment says where the others are (NCCL on GPUs)
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    train, val, test = (x[:400], y[:400]), (x[400:500], y[400:500]), (x[500:], y[500:])

    torch.manual_seed(0)
    plan = topdown.Cascade(Net(), BLOCKS, build_model=Net, metric="error", out=args.out, resume=args.resume)
    try:
        for stage in plan:
            # built after the plan froze the stage's other blocks: DDP syncs exactly the trainable ones
            model = DistributedDataParallel(stage.model)
            optimizer = torch.optim.SGD(stage.trainable_parameters(), lr=0.05, momentum=0.9)  # rule 1
            order = torch.Generator().manual_seed(stage.seed)  # the same shuffle on every rank
            for _ in range(args.epochs):
                model.train()  # rule 2: frozen blocks stay in eval mode
                mine = torch.randperm(len(train[1]), generator=order)[rank::world]  # this rank's share
                for i in range(0, len(mine) - 15, 16):  # every rank takes the same number of steps
                    batch = mine[i : i + 16]
                    optimizer.zero_grad()
                    F.cross_entropy(model(train[0][batch]), train[1][batch]).backward()
                    optimizer.step()
            # rule 3: validation of the weights the model holds; rank 0's numbers decide, for every rank
            stage.finish(
                val={"error": error(stage.model, *val)},
                test={"error": error(stage.model, *test)},
                epochs=args.epochs,
            )
    except Exception:
        plan.fail()  # on record: the run stopped on an error (resume continues it)
        raise
    dist.destroy_process_group()
    return plan.summary


if __name__ == "__main__":
    summary = main()
    if topdown.distributed.is_writer():
        print(f"chosen stage {summary['chosen_stage']}; test {summary['test']}")
