"""The command line's arguments: every command, its options and help (``topdown --help``)."""

from __future__ import annotations

import argparse
import textwrap

from topdown.arms import DEFAULT_ARMS
from topdown.procedures import PLANS
from topdown.tasks import PRESET_NAMES, TASKS

EPILOG = """examples:
  topdown cascade asr-rnn                       # the default job: demo preset, bundled AN4
  topdown baseline digits --preset tiny --seed 3
  topdown cascade digits --set cascade.splits=[3,1] --set cascade.candidates=2
  topdown retrain-classifier asr-rnn --split 2 --preset tiny
  topdown transfer-classifier digits --split 2 --subset 0.25
  topdown run forgetting digits                  # any plan by name: every procedure above, and the others
  topdown run myplans:MyPlan digits              # a topdown.Plan subclass of your own, in ./myplans.py
  topdown cascade asr-rnn --out runs/x --resume  # continue an interrupted run
  topdown cascade digits --config runs/x/config.yaml --out runs/y  # run x's configuration again
  topdown cascade digits --track tensorboard,mlflow  # also log to TensorBoard and MLflow (in the run dir)
  topdown report runs/x                          # re-render runs/x/report.md
  topdown compare digits --seeds 20              # cascade vs fair baselines over 20 seeds
  topdown compare digits --seeds 20 --arms cascade,forgetting
                                                 # ... and later-layer forgetting as a second arm
  topdown compare digits --seeds 20 --forgetting --budget-arms cascade --out x \\
      --runs-from bench/results/digits-compare-demo-full-budget/runs.tar.xz
                                                 # rebuild a committed comparison from its runs, no training
  topdown compare digits --seeds 20 --only equal-epochs-seed3  # only that run of the comparison
  topdown compare digits --seeds 5 --until-margin 0.5 --max-seeds 50
                                                 # add seeds until every difference is beyond 0.5 points
  topdown sweep digits --seeds 5 --axis train.lr=0.001,0.01 --axis model.hidden=32,64
                                                 # a comparison per cell of a grid of config values
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
    "forget": "later-layer forgetting (an alias of `topdown run forgetting`): from the baseline, "
    "re-initialise the blocks above K and train every block, round after round",
}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topdown",
        description="Top-down (classifier-first) cascade training (Zhang et al., ICASSP 2021).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("task", choices=list(TASKS), help="the task (model family and data)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="size preset (default: demo; with --data-dir, the task's recipe for a corpus of your own where "
        "it has one: bench for the ASR tasks)",
    )
    common.add_argument(
        "--out", help="output directory (default: runs/TASK-COMMAND-PRESET[-seedN]; for run, COMMAND is PLAN)"
    )
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.lr=0.01 (repeatable; over --config)",
    )
    common.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="config keys from a YAML file, as --set names them (train: {lr: 0.01}; some sections or all): "
        "over the preset, under --set; a run's DIR/config.yaml runs it again",
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
    common.add_argument(
        "--track",
        type=_names,
        default=[],
        metavar="TRACKER[,TRACKER...]",
        help="also log every epoch and stage to tensorboard (DIR/tensorboard), mlflow (DIR/mlruns, or "
        "--mlflow-uri), or both (the tracking extra); not part of the run's identity",
    )
    common.add_argument(
        "--mlflow-uri", metavar="URI", help="the MLflow tracking URI for --track mlflow (default: DIR/mlruns)"
    )
    single = argparse.ArgumentParser(add_help=False)
    single.add_argument(
        "--seed", type=int, default=0, help="run seed: initialisation, shuffling, dropout (default: 0)"
    )
    single.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last completed epoch"
    )
    for name, text in HELP.items():
        _plan_options(sub.add_parser(name, parents=[task, common, single], help=text, description=text), name)
    text = "run a plan by name: a built-in one, or a topdown.Plan subclass of your own (module:Class)"
    plan = argparse.ArgumentParser(add_help=False)
    plan.add_argument(
        "plan",
        metavar="PLAN",
        help=f"a built-in plan ({', '.join(PLANS)}) or module:Class, a topdown.Plan subclass importable "
        "from here (the working directory first); its procedure.* options: --set procedure.KEY=VALUE",
    )
    _plan_options(
        sub.add_parser("run", parents=[plan, task, common, single], help=text, description=text), "run"
    )
    comparison = argparse.ArgumentParser(add_help=False)  # compare's and sweep's
    comparison.add_argument(
        "--seeds",
        type=int,
        required=True,
        help="number of seeds (0..N-1; compare with --until-margin: the first N)",
    )
    arms = comparison.add_mutually_exclusive_group()
    arms.add_argument(
        "--arms",
        type=_names,
        default=list(DEFAULT_ARMS),
        metavar="PLAN[,PLAN...]",
        help="the plans compared, each run per seed, as `topdown run` names them (default: cascade); the "
        "equal-epochs baseline gets the largest budget among them",
    )
    arms.add_argument(
        "--forgetting",
        dest="arms",
        action="store_const",
        const=["cascade", "forgetting"],
        help="shorthand for --arms cascade,forgetting (later-layer forgetting beside the cascade)",
    )
    comparison.add_argument(
        "--effect",
        type=float,
        metavar="X",
        help="also report, per paired difference, the seeds a difference of X would need (80 %% power, "
        "two-sided 5 %%, at the observed spread); X in the units compare.md shows (points for a rate)",
    )
    comparison.add_argument(
        "--budget-arms",
        type=_names,
        metavar="ARM[,ARM...]",
        help="the arms whose largest total epochs, per seed, the equal-epochs baseline is given (default: "
        "every arm); a compare.json without budget_arms gave it the cascade's (--budget-arms cascade)",
    )
    p = sub.add_parser(
        "compare",
        parents=[task, common, comparison, executor_options()],
        help="fair comparison over seeds: the cascade (or other plans: --arms), baseline, baseline with "
        "equal epochs, best-of-k baselines",
        description="Runs (or resumes) the arms and controls of a fair comparison (docs/usage.md, 'Fair "
        "comparisons') for seeds 0..N-1 and writes DIR/compare.json, DIR/compare.md and DIR/compare.png. "
        "Finished runs are never trained again; a finished run made with another preset or --set, on other "
        "data (its task_info) or under another metric is refused, never mixed in; a chosen model whose test "
        "metric is NaN or missing stops the comparison, naming its run.",
    )
    p.add_argument(
        "--until-margin",
        type=float,
        metavar="M",
        help="add seeds (--jobs at a time) beyond --seeds until each difference's anytime-valid 95 %% "
        "interval lies beyond +-M (units as --effect; 0: excludes zero), or --max-seeds is reached",
    )
    p.add_argument("--max-seeds", type=int, metavar="N", help="the seed budget of --until-margin")
    p.add_argument(
        "--until-controls",
        type=_names,
        metavar="NAME[,NAME...]",
        help="the differences --until-margin waits for (default: all): cascade minus each named control "
        "or arm; without a cascade arm, each named arm minus the baseline",
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
        "sweep",
        parents=[task, common, comparison, executor_options()],
        help="a fair comparison per cell of a grid of config values (--axis KEY=V1,V2,...), same seeds",
        description=textwrap.fill(  # wrapped here: the raw formatter keeps the example's lines as they are
            "Runs (or resumes) one fair comparison, as `topdown compare` makes it, per cell of the product "
            "of the axes (docs/usage.md, 'Sweeps'), each in DIR/cells/KEY=VALUE,KEY=VALUE, and writes "
            "DIR/sweep.json, DIR/sweep.md and DIR/sweep.png: per cell, each arm's and control's mean test "
            "metric and paired difference to the baseline, as the cell's compare.json has them. Every "
            "cell's configuration is checked before anything runs; finished runs are never trained again, "
            "so the same command continues a sweep, and more values add cells beside those there.",
            79,
        ),
        epilog="example:\n  topdown sweep digits --preset tiny --seeds 5 --axis train.lr=0.001,0.003,0.01 "
        "--axis model.hidden=32,64 --jobs 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--axis",
        action="append",
        required=True,
        metavar="KEY=VALUE[,VALUE...]",
        help="a config key, as --set names it, and the values it takes, each read as --set reads it (commas "
        "inside [ ] or { } belong to a value: cascade.splits=[3,1],[2,1]); repeat for more axes",
    )
    p.add_argument(
        "--runs-from",
        metavar="ARCHIVE",
        help="first restore into each cell's runs each finished run it lacks from ARCHIVE (a sweep's "
        "runs.tar.xz, or another sweep's directory): the sweep reuses them, training none again",
    )
    p = sub.add_parser(
        "analyse",
        parents=[task, common, executor_options()],
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
    p = sub.add_parser(
        "report",
        help="re-render report.md and curves.png of a run directory; of a compare or analyse "
        "directory (or any directory of runs), show where each of its runs stands (and, for a "
        "comparison, the arms of each seed so far); of a sweep's directory, where each cell stands",
    )
    p.add_argument(
        "dir", help="run directory, the --out of compare/analyse/sweep, or a directory of run directories"
    )
    p = sub.add_parser("list", help="tasks, presets and the blocks of each task's model")
    p.add_argument(
        "--config", metavar="TASK", choices=list(TASKS), help="print this task's resolved config for --preset"
    )
    p.add_argument("--preset", default="demo", choices=PRESET_NAMES)
    return parser


def executor_options() -> argparse.ArgumentParser:
    """Where a command made of many runs runs them (``executors.from_args`` reads these)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("where the runs run (docs/usage.md, 'Runs on a cluster')")
    group.add_argument(
        "--executor",
        choices=["local", "ray", "slurm"],
        default="local",
        help="local: processes on this machine (--jobs); ray: each run a Ray task, on a local Ray instance "
        "or the cluster at --address; slurm: each run a SLURM job (submitit), its logs in DIR/slurm "
        '(default: local; ray and slurm need pip install "topdown[cluster]")',
    )
    group.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="local: run the runs in N processes, threads divided among them unless OMP_NUM_THREADS is set "
        "(default: 1)",
    )
    group.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="ray: the running cluster's address (or auto) instead of a local instance",
    )
    group.add_argument(
        "--cpus-per-run",
        type=int,
        metavar="N",
        help="ray, slurm: CPUs each run asks for and torch threads it trains with (default: OMP_NUM_THREADS, "
        "else 1)",
    )
    group.add_argument(
        "--slurm-partition", metavar="NAME", help="slurm: the partition (default: the cluster's)"
    )
    group.add_argument(
        "--slurm-time",
        type=int,
        metavar="MINUTES",
        help="slurm: each job's time limit (default: the partition's); a job that reaches it is requeued and "
        "its run resumes",
    )
    group.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="slurm: a further sbatch option for every job, e.g. account=proj, gres=gpu:1, mem=8G "
        "(repeatable)",
    )
    group.add_argument(
        "--slurm-local",
        action="store_true",
        help="slurm: run each job as a process on this machine (submitit's local executor), without a "
        "cluster",
    )
    return options


def _names(text: str) -> list[str]:
    """A comma-separated list of names."""
    return [name for name in text.split(",") if name]


def _plan_options(p: argparse.ArgumentParser, name: str) -> None:
    """The options of the command that runs plan ``name`` (``run``: any plan)."""
    if name != "baseline":
        p.add_argument(
            "--from",
            dest="from_checkpoint",
            metavar="CKPT",
            help="start from this checkpoint instead of training a baseline (transfer-classifier: the "
            "full-data model): a safetensors file or a save_pretrained directory",
        )
    if name in ("retrain-classifier", "transfer-classifier"):
        p.add_argument("--split", type=int, required=True, help="K: blocks 1..K are the feature extractor")
    if name == "forget":
        p.add_argument(
            "--split", type=int, help="K: forget the blocks above K (default: the cascade's first split)"
        )
    if name == "run":
        p.add_argument("--split", type=int, help="K: procedure.split, for a plan that reads it")
        p.add_argument("--subset", type=float, help="procedure.subset, for a plan that reads it")
    if name == "transfer-classifier":
        p.add_argument("--subset", type=float, required=True, help="fraction of the training data, in (0, 1)")
