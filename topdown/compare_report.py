"""A comparison's report: ``compare.md`` (what each arm and control is, the tables of test metrics
and paired differences, what the seeds could detect, why a sequential comparison stopped) and
``compare.png`` (each arm's test metric per seed), both drawn from the ``compare.json`` record
(``topdown.compare``) alone, so that an older record renders as well.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from topdown.arms import CONTROLS
from topdown.metrics import display_scale
from topdown.report import format_metric, save_figure, table_head


def _arms_described(record: dict[str, Any]) -> str:
    """What each arm and control of ``record`` is, for compare.md (a record made before
    ``budget_arms`` was recorded gave the equal-epochs baseline the cascade's epochs)."""
    arms = [a for a in record["arms"] if a not in CONTROLS]
    cascade = "cascade" in arms
    budget = record.get("budget_arms", ["cascade"])
    return (
        "Epochs and seconds: the cost of all the arm's training runs. Arms: "
        + ", ".join(arms)
        + ". Controls: "
        + ("the cascade's own stage 0" if cascade else "a baseline run")
        + " (baseline); one baseline trained for "
        + ("all the cascade's epochs" if budget == ["cascade"] else f"the most epochs of {', '.join(budget)}")
        + ", early stopping off (baseline-equal-epochs); the best on validation of as many baselines as "
        + ("the cascade" if cascade else "the arm that trained the most")
        + " trained models (best-of-k)."
    )


def render(record: dict[str, Any]) -> str:
    """compare.md; a record written before ``detectable`` (or without ``stopping``, ``effect``)
    shows "-" or leaves out what it lacks."""
    m = record["metric"]
    _, unit = display_scale(m)
    stopping = record.get("stopping")

    def f(x: float) -> str:
        return format_metric(x, m, sign=False)

    def interval(ci: list[float] | None) -> str:
        return f"[{f(ci[0])}, {f(ci[1])}]" if ci else "[−∞, ∞]"

    lines = [
        f"# Fair comparison on {record['task']} (preset {record['preset']}, {record['seeds']} seeds)",
        "",
        *textwrap.wrap(
            f"Test {m}{unit} of the model each arm's validation chose; differences are arm minus baseline, "
            f"paired by seed ({'lower' if record['lower_is_better'] else 'higher'} is better). CI: 95 % "
            "Student-t interval of the mean paired difference; detectable: the smallest true difference a "
            "two-sided 5 % paired t-test over these seeds detects with 80 % power, were its spread the one "
            "observed (a CI that holds zero says little about differences smaller than that); p: two-sided "
            "sign-flip test (exact up to 20 seeds, else 200,000 random sign patterns). "
            + _arms_described(record),
            100,
            break_on_hyphens=False,
        ),
        "",
        *([f"Note: {record['note']}", ""] if record.get("note") else []),
        *(_stopping_described(stopping, f) if stopping else []),
    ]
    anytime = ["anytime-valid 95 %"] if stopping else []
    lower = record["lower_is_better"]

    def paired_cells(v: dict[str, Any] | None) -> list[str]:
        """Mean difference [95 % CI] | anytime-valid interval | detectable | sign-flip p | seeds
        better/worse for the first of the pair."""
        if v is None:
            return ["-"] * (4 + len(anytime))
        diff = f"{f(v['mean'])} {interval(v['ci95'])}" if v["ci95"] else f(v["mean"])
        return [
            diff,
            *([interval(v.get("cs95"))] if stopping else []),
            f(v["detectable"]) if v.get("detectable") is not None else "-",
            f"{v['p_sign_flip']:.3f}",
            _better_worse(v, lower),
        ]

    lines += table_head(
        [
            "arm",
            f"test {m} mean ± std",
            "diff vs baseline [95 % CI]",
            *anytime,
            "detectable",
            "p",
            "better/worse seeds",
            "epochs",
            "seconds",
        ]
    )
    for arm, a in record["arms"].items():
        t = a["test"]
        spread = f" ± {f(t['std'])}" if t["std"] is not None else ""
        cells = [arm, f"{f(t['mean'])}{spread}", *paired_cells(a["vs_baseline"])]
        lines.append(
            "| " + " | ".join([*cells, f"{a['epochs']['mean']:.1f}", f"{a['seconds']['mean']:.1f}"]) + " |"
        )
    lines += _against_controls(record, f, interval)
    if "cascade" in record["arms"]:
        lines += [
            "",
            "Cascade against each control and arm, paired by seed (cascade minus control; "
            f"{'negative' if lower else 'positive'} favours the cascade):",
            "",
            *table_head(
                [
                    "control",
                    "cascade − control [95 % CI]",
                    *anytime,
                    "detectable",
                    "p",
                    "seeds where the cascade is better/worse",
                ]
            ),
        ]
        lines += [
            "| " + " | ".join([arm, *paired_cells(a["cascade_minus_arm"])]) + " |"
            for arm, a in record["arms"].items()
            if arm != "cascade"
        ]
    if record.get("effect") is not None:
        lines += ["", *_seeds_needed_described(record, f)]
    lines += ["", "Per seed (test):", "", *table_head(["seed", *record["arms"]])]
    for s in range(record["seeds"]):
        lines.append(
            f"| {s} | " + " | ".join(f(a["per_seed"][s]["test"]) for a in record["arms"].values()) + " |"
        )
    return "\n".join(lines) + "\n\n![test metric per arm](compare.png)\n"


def _better_worse(v: dict[str, Any], lower_is_better: bool) -> str:
    """A paired difference's seeds where the first of the pair is better / worse."""
    better, worse = (v["lower"], v["higher"]) if lower_is_better else (v["higher"], v["lower"])
    return f"{better}/{worse}"


def _against_controls(
    record: dict[str, Any], f: Callable[[float], str], interval: Callable[[list[float] | None], str]
) -> list[str]:
    """compare.md's table of each arm against every control (none for a record made before
    ``vs_controls`` was recorded)."""
    arms = {arm: a for arm, a in record["arms"].items() if "vs_controls" in a}
    if not arms:
        return []
    controls = list(next(iter(arms.values()))["vs_controls"])
    lower = record["lower_is_better"]

    def cell(v: dict[str, Any]) -> str:
        return f"{f(v['mean'])} {interval(v['ci95'])}, {_better_worse(v, lower)}"

    return [
        "",
        *textwrap.wrap(
            "Each arm against every control, paired by seed (arm minus control [95 % CI], seeds where the "
            f"arm is better/worse); an arm beats every control where each interval lies wholly "
            f"{'below' if lower else 'above'} zero. A plan that is a control (restarts) is one here.",
            100,
            break_on_hyphens=False,
        ),
        "",
        *table_head(["arm", *[f"arm − {c}" for c in controls], "beats every control"]),
        *(
            "| "
            + " | ".join(
                [
                    arm,
                    *(cell(a["vs_controls"][c]) for c in controls),
                    "yes" if a["beats_every_control"] else "no",
                ]
            )
            + " |"
            for arm, a in arms.items()
        ),
    ]


def _stopping_described(stopping: dict[str, Any], f: Callable[[float], str]) -> list[str]:
    """The sequential comparison's rule and why it stopped, for compare.md."""
    names = ", ".join(
        f"cascade − {c}" if stopping["difference"] == "cascade_minus_arm" else f"{c} − baseline"
        for c in stopping["controls"]
    )
    why = (
        "every one's interval lay beyond the margin"
        if stopping["stopped"] == "margin excluded"
        else f"the seed budget was spent ({', '.join(stopping['undecided'])} undecided)"
    )
    if within := stopping.get("within_margin"):
        why += (
            f"; the intervals of {', '.join(within)} lie within ±{f(stopping['margin'])}, so any "
            "difference there is smaller"
        )
    text = (
        f"Sequential: seeds added from {stopping['start']}, {stopping['batch']} at a time, at most "
        f"{stopping['max_seeds']}, until the anytime-valid 95 % interval (a confidence sequence, valid "
        f"however the seeds were stopped; docs/usage.md) of {names} lay beyond ±{f(stopping['margin'])}; "
        f"stopped after {stopping['looks'][-1]} seeds: {why}. The t-intervals (CI) and p-values assume "
        "a number of seeds fixed in advance and are shown for reference."
    )
    return [*textwrap.wrap(text, 100, break_on_hyphens=False), ""]


def _seeds_needed_described(record: dict[str, Any], f: Callable[[float], str]) -> list[str]:
    """The seeds each paired difference would need to detect ``effect``, for compare.md."""

    def needed(v: dict[str, Any]) -> str:
        return "? (one seed: no spread)" if v["seeds_needed"] is None else str(v["seeds_needed"])

    arms = record["arms"]
    parts = [
        "vs baseline: "
        + ", ".join(f"{a} {needed(v['vs_baseline'])}" for a, v in arms.items() if v["vs_baseline"])
    ]
    if "cascade" in arms:
        parts.append(
            "cascade − control: "
            + ", ".join(
                f"{a} {needed(v['cascade_minus_arm'])}" for a, v in arms.items() if v["cascade_minus_arm"]
            )
        )
    text = (
        f"Seeds needed to detect a paired difference of {f(record['effect'])} (two-sided 5 % paired "
        "t-test, 80 % power, at each difference's observed spread): " + "; ".join(parts) + "."
    )
    return textwrap.wrap(text, 100, break_on_hyphens=False)


def plot(record: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: a library call leaves the user's backend alone

    m = record["metric"]
    scale, unit = display_scale(m)
    arms = list(record["arms"])
    fig = Figure(figsize=(max(7.0, 1.2 * len(arms)), 4))  # room for every arm's name
    ax = fig.subplots()
    n = record["seeds"]
    offsets = (
        np.linspace(-0.15, 0.15, n) if n > 1 else np.zeros(1)
    )  # seed j sits at the same offset in every arm
    ys = np.array(
        [[scale * e["test"] for e in record["arms"][arm]["per_seed"]] for arm in arms]
    )  # (arms, seeds)
    for j in range(n):  # thin lines pair each seed across arms
        ax.plot(np.arange(len(arms)) + offsets[j], ys[:, j], color="grey", lw=0.3, alpha=0.5)
    for i in range(len(arms)):
        ax.scatter(i + offsets, ys[i], s=14, alpha=0.7, color=f"C{i}", zorder=3)
        ax.errorbar(
            i + 0.3, ys[i].mean(), yerr=ys[i].std(ddof=1) if n > 1 else 0, fmt="o", color="black", capsize=4
        )
    ax.set_xticks(
        range(len(arms)), arms, rotation=20 if len(arms) > 5 else 0, ha="right" if len(arms) > 5 else "center"
    )
    ax.set_ylabel(f"test {m}{unit}")
    ax.set_title(f"{record['task']} ({record['preset']}): {record['seeds']} seeds; black = mean ± std")
    save_figure(fig, path)
