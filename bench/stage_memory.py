"""Peak memory of a cascade stage against a plain training step, as multiples of the model's size.

Usage:

    OMP_NUM_THREADS=1 python bench/stage_memory.py [--width 2048] [--depth 7] [--device cpu]
        [--before DIR]

The model is an MLP of ``depth`` hidden blocks (Linear width x width, ReLU) under an output block
(Linear width x 1000): 126 MB of float32 parameters at the defaults, trained with Adam on batches of
64. Each row runs in a fresh process and reports the peak of the bytes held by live tensors on the
model's device during its window (the model itself included):

- ``plain step``: building the model, one training step over all of it (forward, backward, Adam);
- ``cascade stage, split K``: a cascade (``topdown.Cascade``, its run directory in a temporary
  folder) whose stage 0 is finished untrained; the window is stage 1: prepared (blocks 1..K
  re-initialised from a model ``build_model()`` builds with the stage's seed, the classifier
  above them frozen), one step of Adam over its trainable parameters, ``finish``;
- ``prepared only``: the window closes once the stage is handed out (start weights loaded, blocks
  re-initialised from the fresh model, which is gone by then);
- ``2 candidates``: the same with ``cascade.candidates=2`` (the first candidate's weights are kept
  while the second trains);
- ``forgetting round, split K``: later-layer forgetting's first round: the blocks above K
  re-initialised, every block trained;
- ``our loop``: two epochs of one step each by our training loop (``topdown.loop.fit``), which keeps
  its best epoch's weights while the next epoch trains and writes a resume point after each epoch
  (the model, Adam's moments, the kept weights), as the command line has it do.

``build_model()`` builds on the CPU and the plan's model is moved to ``--device``, as the command
line and docs/trainers.md do; on an accelerator, the ``fresh model on the device`` row has
``build_model()`` build there instead. ``--before DIR`` measures every row a second time with the
``topdown`` package of another checkout (e.g. the commit before a change), side by side.

On CPU the live bytes are counted from PyTorch's allocator events (``torch.profiler`` with
``profile_memory``): every tensor allocation and free, temporaries inside operators included, and
nothing else. The process's peak resident size would add the interpreter, the libraries and memory
that glibc keeps after a free, so rows would differ by the allocator's noise rather than by what
they hold. On CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 1000
BATCH = 64
Window = Callable[[], AbstractContextManager]  # opens the span whose memory a row reports


@dataclass
class Span:
    """Bytes held by live tensors on a device: as a window opened, at its peak, as it closed."""

    start: int
    peak: int
    end: int


def build(width: int, depth: int, device: str = "cpu") -> nn.Module:
    hidden = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)]
    return nn.Sequential(*hidden, nn.Linear(width, CLASSES)).to(device)


def block_spec(depth: int) -> list[tuple[str, list[str]]]:
    return [(f"block{i + 1}", [str(i)]) for i in range(depth)] + [("output", [str(depth)])]


def batch(width: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, width, generator=g), torch.randint(CLASSES, (BATCH,), generator=g)
    return x.to(device), y.to(device)


def step(model: nn.Module, opt: torch.optim.Optimizer, xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    nn.functional.cross_entropy(model(xy[0]), xy[1]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def task(args: argparse.Namespace, xy: tuple[torch.Tensor, torch.Tensor]):
    """The same model and batch as a ``topdown.Task`` for our loop: one step per epoch, and a
    validation error that falls every epoch, so each epoch is the best so far and is kept."""
    import topdown

    validated = iter(range(1000))
    return topdown.Task(
        name="stage-memory",
        build_model=lambda: build(args.width, args.depth),
        blocks=block_spec(args.depth),
        train_batches=lambda generator, subset: [xy],
        loss=lambda model, b: nn.functional.cross_entropy(model(b[0]), b[1]),
        evaluate=lambda model, split: {"error": 1.0 / (2 + next(validated))},
        metric="error",
    )


def plain(args: argparse.Namespace, window: Window, our_loop: bool = False) -> None:
    device = torch.device(args.device)
    with window():
        torch.manual_seed(0)
        model = build(args.width, args.depth, args.device)
        xy = batch(args.width, args.device)
        if our_loop:
            from topdown.config import TrainConfig
            from topdown.loop import fit

            with tempfile.TemporaryDirectory() as out:
                resume = Path(out) / "resume.safetensors"
                fit(model, task(args, xy), TrainConfig(epochs=2), seed=0, resume_path=resume, device=device)
        else:
            step(model, torch.optim.Adam(model.parameters()), xy)


def stage(
    args: argparse.Namespace,
    window: Window,
    plan: str,
    config: dict,
    our_loop: bool = False,
    fresh_on_device: bool = False,
    prepare_only: bool = False,
) -> None:
    """A plan (``topdown.PLANS``' name) over the model, its run directory in a temporary folder:
    stage 0 finished untrained, then stage 1 (every candidate) in the window."""
    import topdown
    from topdown.config import TrainConfig
    from topdown.loop import fit

    torch.manual_seed(0)
    model = build(args.width, args.depth).to(args.device)
    xy = batch(args.width, args.device)
    where = args.device if fresh_on_device else "cpu"
    with tempfile.TemporaryDirectory() as out:
        stages = iter(
            topdown.plan_class(plan)(
                model,
                block_spec(args.depth),
                build_model=lambda: build(args.width, args.depth, where),
                metric="error",
                out=out,
                config=config,
            )
        )
        next(stages).finish(val={"error": 1.0})  # the baseline, untrained
        with window():  # the run is left unfinished: its end is no stage's
            for c in range(config.get("cascade", {}).get("candidates", 1)):
                s = next(stages)
                if prepare_only:
                    return
                if our_loop:
                    result = fit(
                        s.model,
                        task(args, xy),
                        TrainConfig(epochs=2),
                        seed=s.seed,
                        resume_path=s.resume_path,
                        device=torch.device(args.device),
                    )
                    s.finish(val=result.val, epochs=result.epochs)
                else:
                    step(s.model, torch.optim.Adam(s.trainable_parameters()), xy)
                    s.finish(val={"error": 0.5 + c / 10})


def measure(work: Callable[[Window], None], device: str) -> Span:
    """The live tensor bytes on ``device`` in the window that ``work`` opens (once)."""
    if device.startswith("cuda"):
        span = Span(0, 0, 0)

        @contextlib.contextmanager
        def window() -> Iterator[None]:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            span.start = torch.cuda.memory_allocated(device)
            yield
            torch.cuda.synchronize(device)
            span.peak, span.end = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)

        work(window)
        return span
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work(lambda: record_function("window"))
    events = list(prof.profiler.kineto_results.events())
    opened, closed = next((e.start_ns(), e.end_ns()) for e in events if e.name() == "window")
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    live = sum(n for t, n in memory if t < opened)
    span = Span(live, live, live)
    for _, nbytes in (m for m in memory if opened <= m[0] <= closed):
        live += nbytes
        span.peak = max(span.peak, live)
    span.end = live
    return span


def rows(args: argparse.Namespace) -> dict[str, tuple[Callable[[Window], None], slice]]:
    """Each row's work, and which of the model's blocks (children) its stage re-initialises."""
    top, half = args.depth, args.depth // 2
    cascade = {"cascade": {"splits": [top]}}
    out = {
        "plain step": (lambda w: plain(args, w), slice(0)),
        f"cascade stage, split {top}": (lambda w: stage(args, w, "cascade", cascade), slice(top)),
        f"cascade stage, split {top}, prepared only": (
            lambda w: stage(args, w, "cascade", cascade, prepare_only=True),
            slice(top),
        ),
        f"cascade stage, split {half}": (
            lambda w: stage(args, w, "cascade", {"cascade": {"splits": [half]}}),
            slice(half),
        ),
        f"cascade stage, split {top}, 2 candidates": (
            lambda w: stage(args, w, "cascade", {"cascade": {"splits": [top], "candidates": 2}}),
            slice(top),
        ),
        f"forgetting round, split {top}": (
            lambda w: stage(args, w, "forgetting", {"procedure": {"split": top, "rounds": 1}}),
            slice(top, None),
        ),
        "plain, our loop": (lambda w: plain(args, w, our_loop=True), slice(0)),
        f"cascade stage, split {top}, our loop": (
            lambda w: stage(args, w, "cascade", cascade, our_loop=True),
            slice(top),
        ),
    }
    if args.device != "cpu":
        out[f"cascade stage, split {top}, fresh model on the device"] = (
            lambda w: stage(args, w, "cascade", cascade, fresh_on_device=True),
            slice(top),
        )
    return out


def run_row(name: str, args: argparse.Namespace, code: Path) -> Span:
    """``name``'s span, measured in a fresh process that imports ``topdown`` from ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    size = ["--width", str(args.width), "--depth", str(args.depth), "--device", args.device]
    done = subprocess.run(
        [sys.executable, __file__, "--row", name, *size], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"row {name!r} failed with {code}:\n{done.stderr.strip()}")
    return Span(**json.loads(done.stdout.strip().splitlines()[-1]))


def reinit_bytes(model: nn.Module, blocks: slice) -> int:
    """The parameters of the model's children ``blocks``."""
    return sum(p.numel() * p.element_size() for block in list(model)[blocks] for p in block.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048, help="hidden width (default 2048)")
    parser.add_argument("--depth", type=int, default=7, help="hidden blocks below the output (default 7)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--before", type=Path, help="another checkout, whose topdown is measured alongside")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # measure one row in this process
    args = parser.parse_args()
    if args.row is not None:
        print(json.dumps(asdict(measure(rows(args)[args.row][0], args.device))))
        return
    if args.before is not None and not (args.before / "topdown" / "__init__.py").is_file():
        sys.exit(f"--before {args.before}: no topdown package there")

    model = build(args.width, args.depth)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    codes = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    mib = 2**20
    print(f"$ python bench/stage_memory.py {' '.join(sys.argv[1:])}")
    sys.path.insert(0, str(ROOT))  # here only: a row's process imports the topdown it is given
    from topdown.provenance import provenance

    made = provenance(torch.device(args.device))
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {made['cpu']}, "
        f"{made.get('gpu') or 'no GPU'}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"device {args.device}"
    )
    print(f"model: {size / mib:.1f} MiB (width {args.width}, {args.depth} hidden blocks and the output)\n")
    print("| row | re-initialised | " + " | ".join(f"peak {c} | x model {c}" for c in codes) + " |")
    print("|---|---:|" + "---:|---:|" * len(codes))
    for name, (_, blocks) in rows(args).items():
        reinit = f"{reinit_bytes(model, blocks) / mib:.1f} MiB" if reinit_bytes(model, blocks) else ""
        cells = []
        for code in codes.values():
            peak = run_row(name, args, code).peak
            cells += [f"{peak / mib:.1f} MiB", f"{peak / size:.2f}"]
        print(f"| {name} | {reinit} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
