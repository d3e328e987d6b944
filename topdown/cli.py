"""``topdown``: run the procedures (any plan, built-in or a user's own) on the built-in tasks, compare
and analyse them, re-render reports, list tasks. The arguments themselves are ``arguments.py``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from pathlib import Path

import yaml

from topdown import distributed, executors, report
from topdown.analyse import run_analyse
from topdown.archive import restore_runs, restore_sweep
from topdown.arguments import parser
from topdown.arms import run_only
from topdown.blocks import entry_parameters
from topdown.compare import finished_seeds, run_compare
from topdown.config import parse_overrides
from topdown.devices import default_device, huge_pages_for_large_tensors, resolve_device
from topdown.errors import TopdownError
from topdown.procedures import run_procedure
from topdown.sweep import parse_axes, run_sweep
from topdown.tasks import TASKS, make_task, resolve_config, task_module
from topdown.tracking import Tracking


def _list(args: argparse.Namespace) -> None:
    if args.config:
        print(yaml.safe_dump(resolve_config(args.config, args.preset, {}).as_dict(), sort_keys=False), end="")
        return
    for name in TASKS:
        module = task_module(name)
        print(module.__doc__.strip().splitlines()[0].replace("``", ""))
        print(f"  presets: {', '.join(module.PRESETS)}")
        if args.preset not in module.PRESETS:
            print(f"  (no {args.preset} preset)")
            continue
        cfg = resolve_config(name, args.preset, {}).task
        model = module.build_model(cfg)
        print(f"  blocks ({args.preset} preset, input to output):")
        blocks = module.block_names(cfg.model)
        params = {b: {id(p): p for e in entries for p in entry_parameters(model, e)} for b, entries in blocks}
        for block, modules in blocks:
            shared = sum(
                p.numel()
                for i, p in params[block].items()
                if any(i in params[o] for o, _ in blocks if o != block)
            )
            count = sum(p.numel() for p in params[block].values())
            note = f"; {shared:,} of them tied with another block" if shared else ""
            print(f"    {block:<12} {count:>10,} parameters  ({', '.join(modules)}{note})")


def _compare(args: argparse.Namespace) -> None:
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set), args.config)
    out = Path(args.out or f"runs/{args.task}-compare-{args.preset}")
    factory = functools.partial(make_task, args.task, cfg.task, args.data_dir)
    executor = executors.from_args(args, out, factory)
    if args.runs_from:
        restored = restore_runs(args.runs_from, out / "runs")
        print(f"restored {len(restored)} finished runs from {args.runs_from} into {out / 'runs'}")
    kw = dict(
        seeds=args.seeds,
        config=cfg,
        preset=args.preset,
        device=args.device,
        executor=executor,
        task_factory=factory,
        arms=args.arms,
        budget_arms=args.budget_arms,
        track=args.track,
    )
    if args.only:
        stopping = ("effect", "until_margin", "max_seeds", "until_controls")  # they act on compare.*
        if given := ["--" + k.replace("_", "-") for k in stopping if getattr(args, k) is not None]:
            raise TopdownError(f"--only writes no compare.*, so {', '.join(given)} cannot apply; drop it")
        for name, summary in run_only(factory(), out, [n for n in args.only.split(",") if n], **kw).items():
            m = summary["metric"]
            test = report.format_metric(summary["stages"][summary["chosen_stage"]]["test"].get(m), m)
            print(f"{name}: finished in {out / 'runs' / name}, test {m} {test}")
        return
    run_compare(
        factory(),
        out,
        **kw,
        effect=args.effect,
        until_margin=args.until_margin,
        max_seeds=args.max_seeds,
        until_controls=args.until_controls,
    )
    print((out / "compare.md").read_text())


def _sweep(args: argparse.Namespace) -> None:
    axes = parse_axes(args.axis)
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set), args.config)
    out = Path(args.out or f"runs/{args.task}-sweep-{args.preset}")
    factory = functools.partial(make_task, args.task, data_dir=args.data_dir)
    executor = executors.from_args(args, out, functools.partial(factory, cfg.task))
    if args.runs_from:
        restored = restore_sweep(args.runs_from, out)
        print(f"restored {len(restored)} finished runs from {args.runs_from} into {out / 'cells'}")
    run_sweep(
        factory(cfg.task),
        out,
        seeds=args.seeds,
        axes=axes,
        config=cfg,
        arms=args.arms,
        budget_arms=args.budget_arms,
        preset=args.preset,
        device=args.device,
        executor=executor,
        task_factory=factory,
        track=args.track,
        effect=args.effect,
    )
    print((out / "sweep.md").read_text())


def _analyse(args: argparse.Namespace) -> None:
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set), args.config)
    out = Path(args.out or f"runs/{args.task}-analyse-{args.preset}-seed{args.seed}")
    factory = functools.partial(make_task, args.task, cfg.task, args.data_dir)
    executor = executors.from_args(args, out, factory)
    run_analyse(
        factory(),
        out,
        config=cfg,
        seed=args.seed,
        subsets=tuple(args.subsets),
        preset=args.preset,
        device=args.device,
        executor=executor,
        task_factory=factory,
        track=args.track,
    )
    print((out / "analyse.md").read_text())


def _run(args: argparse.Namespace) -> None:
    """``topdown run PLAN TASK``, and each procedure's own command (``topdown cascade TASK``)."""
    flags = {
        k: v
        for k, v in (("split", getattr(args, "split", None)), ("subset", getattr(args, "subset", None)))
        if v is not None
    }
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set), args.config)
    if flags:  # --split/--subset are procedure.split/subset, set last
        cfg = cfg.updated({"procedure": flags})
    plan = args.plan if args.command == "run" else args.command  # `topdown cascade` is `topdown run cascade`
    out = Path(args.out or f"runs/{args.task}-{plan}-{args.preset}-seed{args.seed}")
    task = make_task(args.task, cfg.task, args.data_dir)
    summary = run_procedure(
        plan,
        task,
        out,
        config=cfg,
        seed=args.seed,
        preset=args.preset,
        resume=args.resume,
        from_checkpoint=getattr(args, "from_checkpoint", None),
        device=args.device,
        track=args.track,
    )
    if not distributed.is_writer():
        return
    print(report.stage_table(summary))
    test = ", ".join(
        f"{name} {report.format_metric(value, name)}" for name, value in (summary["test"] or {}).items()
    )
    print(f"\nchosen stage {summary['chosen_stage']}; test {test or '-'}")
    if summary.get("task_info", {}).get("note"):
        print(f"note: {summary['task_info']['note']}")
    print(f"report: {out / 'report.md'}")


def _default_preset(args: argparse.Namespace) -> str:
    """``demo`` is a short demonstration sized for the bundled corpus; on a corpus of the user's own it
    over-fits (60 % against bench's 20 % test WER on a 20-speaker corpus, bench/RESULTS.md), so
    ``--data-dir`` without ``--preset`` starts from the task's own-corpus recipe where it has one."""
    own = (
        getattr(task_module(args.task), "OWN_CORPUS_PRESET", None)
        if getattr(args, "data_dir", None)
        else None
    )
    if own is None:
        return "demo"
    if distributed.is_writer():
        print(
            f"note: --data-dir without --preset: using --preset {own}, the recipe for a corpus of your own "
            f"(the task's page under docs/; --preset demo for the short demonstration)",
            file=sys.stderr,
        )
    return own


def main(argv: list[str] | None = None) -> int:
    huge_pages_for_large_tensors()
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if getattr(args, "nproc", 1) < 1:
        print(f"topdown: error: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
        return 1
    if getattr(args, "device", "") is None:
        args.device = default_device()
    try:
        if hasattr(args, "track"):  # a missing extra is refused before anything starts
            args.track = Tracking(tuple(args.track), args.mlflow_uri)
        if getattr(args, "nproc", 1) > 1 and not distributed.launched():
            return distributed.launch(argv, args.nproc, resolve_device(args.device))
        if hasattr(args, "task") and args.preset is None:
            args.preset = _default_preset(args)
        if args.command == "report" and (cells := report.sweep_cells_of(args.dir)) is not None:
            print(report.sweep_table(cells))  # a sweep: where each cell stands
        elif args.command == "report" and (runs := report.runs_of(args.dir)) is not None:
            print(
                report.runs_table(runs)
            )  # a comparison, analysis or any directory of runs: where each stands
            if (seeds := finished_seeds(runs)) is not None:
                print(f"\n{seeds}")
        elif args.command == "report":
            print(
                report.stage_table(report.read(args.dir)), flush=True
            )  # shown even where the files cannot be rewritten
            print(f"report: {report.write(args.dir)}")
        elif args.command == "list":
            _list(args)
        elif args.command == "compare":
            _compare(args)
        elif args.command == "sweep":
            _sweep(args)
        elif args.command == "analyse":
            _analyse(args)
        else:
            _run(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handlers below, not at exit
    except TopdownError as e:
        print(f"topdown: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = (
            "run the same command again"
            if args.command in ("compare", "sweep", "analyse")
            else "continue with --resume"
        )
        print(f"topdown: interrupted; finished epochs are saved, {again}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # whatever read our output (`| head`) has gone; results are already on disk. Point
        # stdout at /dev/null so that flushing it at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception:  # not the user's input: a bug in topdown (or below it)
        traceback.print_exc()
        print(
            "topdown: internal error: this is a bug, not your input; please report it with the command and "
            "the traceback above",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
