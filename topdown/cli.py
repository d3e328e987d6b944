"""``topdown``: run the four procedures (and the forgetting control) on the built-in tasks, compare and
analyse them, re-render reports, list tasks."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from pathlib import Path

from topdown import distributed, report
from topdown.analyse import run_analyse
from topdown.archive import restore_runs
from topdown.arms import run_only
from topdown.compare import finished_seeds, run_compare
from topdown.config import parse_overrides
from topdown.devices import default_device, huge_pages_for_large_tensors, resolve_device
from topdown.errors import TopdownError
from topdown.procedures import run_procedure
from topdown.tasks import PRESET_NAMES, TASKS, make_task, resolve_config, task_module

EPILOG = """examples:
  topdown cascade asr-rnn                       # the default job: demo preset, bundled AN4
  topdown baseline digits --preset tiny --seed 3
  topdown cascade digits --set cascade.splits=[3,1] --set cascade.candidates=2
  topdown retrain-classifier asr-rnn --split 2 --preset tiny
  topdown transfer-classifier digits --split 2 --subset 0.25
  topdown cascade asr-rnn --out runs/x --resume  # continue an interrupted run
  topdown report runs/x                          # re-render runs/x/report.md
  topdown compare digits --seeds 20              # cascade vs fair baselines over 20 seeds
  topdown compare digits --seeds 20 --forgetting # ... and later-layer forgetting with the cascade's budget
  topdown compare digits --seeds 20 --forgetting --out x \\
      --runs-from bench/results/digits-compare-demo-full-budget/runs.tar.xz
                                                 # rebuild a committed comparison from its runs, no training
  topdown compare digits --seeds 20 --only equal-epochs-seed3  # only that run of the comparison
  topdown analyse digits                         # the paper's two observations, every split
  topdown report runs/digits-compare-demo        # where each run of a comparison stands, and its arms so far
Config keys: see `topdown list --config TASK`. Run directory contract: docs/run-directory.md."""

HELP = {
    "baseline": "train all blocks jointly (stage 0 only)",
    "cascade": "top-down cascade: baseline, then re-train the feature extractor under a frozen classifier, "
    "split by split",
    "retrain-classifier": "from the baseline, freeze blocks 1..K and train a fresh classifier above them",
    "transfer-classifier": "freeze the classifier of a full-data model, train a fresh feature extractor on a "
    "subset",
    "forget": "a control for the cascade: from the baseline, re-initialise the blocks above K and train "
    "every block, round after round",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topdown",
        description="Top-down (classifier-first) cascade training (Zhang et al., ICASSP 2021).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("task", choices=list(TASKS), help="the task (model family and data)")
    common.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="size preset (default: demo; with --data-dir, the task's recipe for a corpus of your own where "
        "it has one: bench for the ASR tasks)",
    )
    common.add_argument("--out", help="output directory (default: runs/TASK-COMMAND-PRESET[-seedN])")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.lr=0.01 (repeatable)",
    )
    common.add_argument("--data-dir", help="read the corpus from this directory instead of the bundled copy")
    common.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    common.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train every stage data-parallel in N processes on this machine (torchrun; gloo on CPU, NCCL "
        "on CUDA)",
    )
    single = argparse.ArgumentParser(add_help=False)
    single.add_argument(
        "--seed", type=int, default=0, help="run seed: initialisation, shuffling, dropout (default: 0)"
    )
    single.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last completed epoch"
    )
    for name, text in HELP.items():
        p = sub.add_parser(name, parents=[common, single], help=text, description=text)
        if name != "baseline":
            p.add_argument(
                "--from",
                dest="from_checkpoint",
                metavar="CKPT",
                help="start from this checkpoint instead of training a baseline (transfer-classifier: the "
                "full-data model)",
            )
        if name in ("retrain-classifier", "transfer-classifier"):
            p.add_argument(
                "--split", type=int, required=True, help="K: blocks 1..K are the feature extractor"
            )
        if name == "forget":
            p.add_argument(
                "--split", type=int, help="K: forget the blocks above K (default: the cascade's first split)"
            )
        if name == "transfer-classifier":
            p.add_argument(
                "--subset", type=float, required=True, help="fraction of the training data, in (0, 1)"
            )
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="fair comparison over seeds: baseline, cascade, baseline with equal epochs, best-of-k baselines",
        description="Runs (or resumes) the arms of a fair comparison (docs/usage.md, 'Fair comparisons') for "
        "seeds 0..N-1 and writes DIR/compare.json, DIR/compare.md and DIR/compare.png. Finished runs are "
        "never trained again; a finished run made with another preset or --set, on other data (its "
        "task_info) or under another metric is refused, never mixed in; a chosen model whose test metric is "
        "NaN or missing stops the comparison, naming its run.",
    )
    p.add_argument("--seeds", type=int, required=True, help="number of seeds (0..N-1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run the comparison's runs in N processes, threads divided among them unless OMP_NUM_THREADS "
        "is set (default: 1)",
    )
    p.add_argument(
        "--forgetting",
        action="store_true",
        help="add an arm: later-layer forgetting (the forget command) with the cascade's budget, per seed",
    )
    p.add_argument(
        "--runs-from",
        metavar="ARCHIVE",
        help="first restore into DIR/runs each finished run it lacks from ARCHIVE (a comparison's "
        "runs.tar.xz, or a directory of run directories): the comparison reuses them, training none again",
    )
    p.add_argument(
        "--only",
        metavar="RUN[,RUN...]",
        help="train (or resume) only these runs of the comparison, as it would (e.g. equal-epochs-seed2, "
        "baseline-seed0-extra1), and write no compare.*",
    )
    p = sub.add_parser(
        "analyse",
        parents=[common],
        help="the paper's two observations for every split: retrain classifier vs feature extractor; "
        "classifier transfer from more data",
        description="From one trained baseline, for every split k: retrain-classifier, "
        "retrain-feature-extractor, and transfer-classifier on each --subsets fraction against a baseline "
        "on the same subset. Writes DIR/analyse.json, DIR/analyse.md and DIR/analyse.png; finished runs are "
        "never trained again, and one made with another preset, seed or --set, on other data (its "
        "task_info) or under another metric is refused; a run whose test metric is NaN or missing stops the "
        "analysis, naming the run.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline and of every run (default: 0)")
    p.add_argument(
        "--subsets",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help="training-data fractions (default: 0.25 0.5)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run the splits in N processes, threads divided among them unless OMP_NUM_THREADS is set "
        "(default: 1)",
    )
    p = sub.add_parser(
        "report",
        help="re-render report.md and curves.png of a run directory; of a compare or analyse "
        "directory (or any directory of runs), show where each of its runs stands (and, for a "
        "comparison, the arms of each seed so far)",
    )
    p.add_argument(
        "dir", help="run directory, the --out of compare/analyse, or a directory of run directories"
    )
    p = sub.add_parser("list", help="tasks, presets and the blocks of each task's model")
    p.add_argument(
        "--config", metavar="TASK", choices=list(TASKS), help="print this task's resolved config for --preset"
    )
    p.add_argument("--preset", default="demo", choices=PRESET_NAMES)
    return parser


def _list(args: argparse.Namespace) -> None:
    import yaml

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
        from topdown.blocks import entry_parameters

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
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set))
    out = Path(args.out or f"runs/{args.task}-compare-{args.preset}")
    if args.runs_from:
        restored = restore_runs(args.runs_from, out / "runs")
        print(f"restored {len(restored)} finished runs from {args.runs_from} into {out / 'runs'}")
    factory = functools.partial(make_task, args.task, cfg.task, args.data_dir)
    kw = dict(
        seeds=args.seeds,
        config=cfg,
        preset=args.preset,
        device=args.device,
        jobs=args.jobs,
        task_factory=factory,
        forgetting=args.forgetting,
    )
    if args.only:
        for name, summary in run_only(factory(), out, [n for n in args.only.split(",") if n], **kw).items():
            m = summary["metric"]
            test = report.format_metric(summary["stages"][summary["chosen_stage"]]["test"].get(m), m)
            print(f"{name}: finished in {out / 'runs' / name}, test {m} {test}")
        return
    run_compare(factory(), out, **kw)
    print((out / "compare.md").read_text())


def _analyse(args: argparse.Namespace) -> None:
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set))
    out = Path(args.out or f"runs/{args.task}-analyse-{args.preset}-seed{args.seed}")
    factory = functools.partial(make_task, args.task, cfg.task, args.data_dir)
    run_analyse(
        factory(),
        out,
        config=cfg,
        seed=args.seed,
        subsets=tuple(args.subsets),
        preset=args.preset,
        device=args.device,
        jobs=args.jobs,
        task_factory=factory,
    )
    print((out / "analyse.md").read_text())


def _run(args: argparse.Namespace) -> None:
    flags = {
        k: v
        for k, v in (("split", getattr(args, "split", None)), ("subset", getattr(args, "subset", None)))
        if v is not None
    }
    cfg = resolve_config(args.task, args.preset, parse_overrides(args.set))
    if flags:  # --split/--subset are procedure.split/subset, set last
        cfg = cfg.updated({"procedure": flags})
    out = Path(args.out or f"runs/{args.task}-{args.command}-{args.preset}-seed{args.seed}")
    task = make_task(args.task, cfg.task, args.data_dir)
    summary = run_procedure(
        args.command,
        task,
        out,
        config=cfg,
        seed=args.seed,
        preset=args.preset,
        resume=args.resume,
        from_checkpoint=getattr(args, "from_checkpoint", None),
        device=args.device,
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
    if distributed.speaks():
        print(
            f"note: --data-dir without --preset: using --preset {own}, the recipe for a corpus of your own "
            f"(the task's page under docs/; --preset demo for the short demonstration)",
            file=sys.stderr,
        )
    return own


def main(argv: list[str] | None = None) -> int:
    huge_pages_for_large_tensors()
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if getattr(args, "nproc", 1) < 1:
        print(f"topdown: error: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
        return 1
    if getattr(args, "device", "") is None:
        args.device = default_device()
    try:
        if getattr(args, "nproc", 1) > 1 and not distributed.launched():
            return distributed.launch(argv, args.nproc, resolve_device(args.device))
        if hasattr(args, "task") and args.preset is None:
            args.preset = _default_preset(args)
        if args.command == "report" and (runs := report.runs_of(args.dir)) is not None:
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
            if args.command in ("compare", "analyse")
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
