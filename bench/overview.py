"""One figure for every fair comparison of bench/RESULTS.md: per task, the cascade minus each
control, paired by seed (dots), with the mean difference and its 95 % t-interval (black), read from
each comparison's committed ``compare.json`` (its runs are in ``runs.tar.xz`` beside it). Below the
zero line the cascade did better: every task's metric here is lower-is-better (error, WER,
perplexity); a higher-is-better one is flipped, and its panel says so.

    python bench/overview.py [COMPARE_DIR ...]   # default: the current comparisons (CURRENT) that exist

Writes ``bench/results/overview.png``; README's results table and this figure come from the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from topdown.metrics import display_scale, is_rate

RESULTS = Path(__file__).resolve().parent / "results"
# the comparisons made with the current protocol, from each task's strongest recipe, and asr-rnn's
# earlier 40-epoch one beside its 80-epoch one (README's table)
CURRENT = (
    "digits-compare-demo-full-budget",
    "image-compare-bench-full-budget",
    "asr-rnn-compare-bench",
    "asr-rnn-e80-compare-bench",
    "asr-transformer-compare-bench",
    "lm-awd-compare-bench",
)


def differences(record: dict) -> dict[str, tuple[list[float], list[float]]]:
    """Per control (every arm of the record but the cascade): the per-seed differences (cascade -
    control, in the plotted unit, sign flipped for a higher-is-better metric) and the 95 % interval
    of their mean."""
    scale, _ = display_scale(record["metric"])
    sign = scale if record["lower_is_better"] else -scale
    cascade = [e["test"] for e in record["arms"]["cascade"]["per_seed"]]
    out = {}
    for arm in [a for a in record["arms"] if a != "cascade"]:
        per_seed = [sign * (c - e["test"]) for c, e in zip(cascade, record["arms"][arm]["per_seed"])]
        ci = record["arms"][arm]["cascade_minus_arm"].get("ci95")
        out[arm] = (per_seed, sorted(sign * x for x in ci) if ci else [])
    return out


def panel(ax, record: dict) -> None:
    diffs = differences(record)
    for i, (arm, (per_seed, ci)) in enumerate(diffs.items()):
        ax.scatter([i - 0.12] * len(per_seed), per_seed, s=12, alpha=0.6, color=f"C{i}", zorder=3)
        mean = sum(per_seed) / len(per_seed)
        if ci:
            ax.errorbar(
                i + 0.12, mean, yerr=[[mean - ci[0]], [ci[1] - mean]], fmt="o", color="black", capsize=4
            )
        else:
            ax.plot(i + 0.12, mean, "o", color="black")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(diffs)), [a.replace("baseline-", "") for a in diffs], rotation=20)
    unit = " (points)" if is_rate(record["metric"]) else ""
    flipped = "" if record["lower_is_better"] else ", sign flipped"
    ax.set_ylabel(f"cascade - control, test {record['metric']}{unit}{flipped}")
    # the recipe's epochs in the title: a preset's length can change after a comparison was made on it
    epochs = record["config"]["train"]["epochs"]
    ax.set_title(
        f"{record['task']} ({record['preset']}, {epochs} epochs), {record['seeds']} seeds", fontsize=10
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dirs", nargs="*", type=Path, help="comparison directories (default: the current ones that exist)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "overview.png")
    args = parser.parse_args()
    dirs = args.dirs or [RESULTS / name for name in CURRENT if (RESULTS / name / "compare.json").is_file()]
    if not dirs:
        sys.exit("overview.py: no compare.json found")
    records = []
    for d in dirs:
        if not (d / "compare.json").is_file():
            sys.exit(f"overview.py: {d}: no compare.json (has the comparison finished and been collected?)")
        records.append(json.loads((d / "compare.json").read_text()))
    fig = Figure(figsize=(3.6 * len(records), 4.2))
    axes = fig.subplots(1, len(records), squeeze=False)[0]
    for ax, record in zip(axes, records):
        panel(ax, record)
    fig.suptitle(
        "Cascade minus each control, paired by seed (dots);\nmean and 95 % t-interval (black); below 0: the "
        "cascade did better",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({', '.join(r['task'] for r in records)})")


if __name__ == "__main__":
    main()
