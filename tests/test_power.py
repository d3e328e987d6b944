"""What a comparison could detect (the paired t-test's power, from the noncentral t distribution) and
the sequential comparison (``--until-margin``) with its anytime-valid interval."""

import json
import math

import numpy as np
import pytest
from conftest import ROOT, cli, toy_task

import topdown.compare as compare
import topdown.procedures as procedures
from topdown.arms import cascade_run, equal_run, extra_run
from topdown.cli import main
from topdown.compare import run_compare
from topdown.compare_report import render
from topdown.config import RunConfig
from topdown.errors import ConfigError
from topdown.stats import (
    anytime_half_width_t,
    anytime_interval,
    detectable,
    excludes,
    nct_cdf,
    paired_stats,
    seeds_needed,
    t975,
    t_power,
)


def test_the_noncentral_t_cdf_matches_exact_cases_a_published_power_and_a_monte_carlo():
    # central t: the 97.5 % quantiles of every t table (t975's, 3 decimals) have P(T <= t) = 0.975
    for df in range(1, 31):
        assert nct_cdf(t975(df), df, 0.0) == pytest.approx(0.975, abs=2e-4), df
    for t in (-30.0, -2.0, 0.5, 12.706):  # 1 df, no noncentrality: Cauchy, 1/2 + atan(t) / pi
        assert nct_cdf(t, 1, 0.0) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-5)
    # many df: normal with mean nc
    assert nct_cdf(1.0, 10**6, 2.5) == pytest.approx(0.5 * math.erfc(1.5 / math.sqrt(2)), abs=1e-4)
    # R's documented example power.t.test(n = 20, delta = 1): power = 0.8689528 (two samples of 20:
    # 38 df, noncentrality sqrt(10), one tail at qt(0.975, 38) = 2.024394)
    assert 1 - nct_cdf(2.024394, 38, math.sqrt(10)) == pytest.approx(0.8689528, abs=1e-6)
    # Monte Carlo at a fixed seed: (Z + nc) / sqrt(chi2_df / df), within 4.5 standard errors
    rng = np.random.default_rng(7)
    for df, nc, t in [(2, 1.5, 2.0), (4, 3.0, 2.776), (9, -1.0, 0.3), (29, 2.8, 2.045)]:
        draws = (rng.standard_normal(200_000) + nc) / np.sqrt(rng.chisquare(df, 200_000) / df)
        p = float(np.mean(draws <= t))
        assert nct_cdf(t, df, nc) == pytest.approx(p, abs=4.5 * math.sqrt(p * (1 - p) / 200_000)), (df, nc)


def test_detectable_and_seeds_needed_match_published_sample_sizes_and_each_other():
    # G*Power, one-sample (paired) t-test, two-tailed alpha 0.05, power 0.80: Cohen's small, medium
    # and large effects need 199, 34 and 15 pairs (scipy.stats.nct gives the same)
    assert [seeds_needed(d, 1.0) for d in (0.2, 0.5, 0.8)] == [199, 34, 15]
    assert seeds_needed(2.0, 4.0) == 34  # only effect / sd matters
    assert seeds_needed(0.5, 0.0) == 2 and seeds_needed(0.5, None) is None
    for n in (2, 3, 5, 10, 34, 60):
        d = detectable(1.0, n)
        assert t_power(d, n) == pytest.approx(0.8, abs=1e-6)
        assert seeds_needed(d * 1.0001, 1.0) == n  # the detectable difference needs exactly these seeds
        assert detectable(0.02, n) == pytest.approx(0.02 * d)  # in the differences' units
    assert 0.49 < detectable(1.0, 34) < 0.5 < detectable(1.0, 33)
    assert detectable(None, 5) is None and detectable(1.0, 1) is None


def test_more_seeds_detect_smaller_differences():
    found = [detectable(1.0, n) for n in range(2, 61)]
    assert all(a > b for a, b in zip(found, found[1:]))
    # about (z_0.975 + z_0.8) sd / sqrt(n) once n is large; far more at 2 seeds
    assert found[-1] == pytest.approx(2.8016 / math.sqrt(60), rel=0.02) and found[0] > 10
    needed = [seeds_needed(e, 1.0) for e in (0.1, 0.2, 0.4, 0.8, 1.6)]
    assert all(a > b for a, b in zip(needed, needed[1:]))


def test_paired_stats_report_detectable_and_on_request_seeds_needed_and_the_anytime_interval():
    values, reference = [0.10, 0.12, 0.08, 0.11, 0.09], [0.12, 0.13, 0.11, 0.10, 0.12]
    s = paired_stats(values, reference)
    assert s["detectable"] == pytest.approx(detectable(s["std"], 5)) and "cs95" not in s
    assert "seeds_needed" not in s
    more = paired_stats(values, reference, effect=0.01, anytime=True)
    assert more["seeds_needed"] == seeds_needed(0.01, s["std"])
    half = anytime_half_width_t(5) * s["std"] / math.sqrt(5)
    assert more["cs95"] == pytest.approx([s["mean"] - half, s["mean"] + half])
    assert more["cs95"][0] < s["ci95"][0] and more["cs95"][1] > s["ci95"][1]  # wider than the t-interval
    one = paired_stats([0.1], [0.2], effect=0.01, anytime=True)
    assert one["detectable"] is None and one["seeds_needed"] is None and one["cs95"] is None


def test_the_anytime_interval_is_a_martingale_boundary_and_covers_at_every_n_at_once():
    """Its Bayes factor has mean 1 under the null (a martingale's), and, looked at after every pair
    from 2 to 50, the interval ever misses the mean in at most 5 % of paths; the t-interval, looked at
    so, misses it in far more."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):  # the Bayes factor against the true mean (module docstring), sd 1.7
        x = rng.normal(0.0, 1.7, size=(200_000, n))
        t2 = (x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))) ** 2
        c = 1 + n
        bf = c**-0.5 * ((1 + t2 / (n - 1)) / (1 + t2 / ((n - 1) * c))) ** (n / 2)
        assert bf.mean() == pytest.approx(1.0, abs=4.5 * bf.std() / math.sqrt(len(bf)))
    assert math.isinf(anytime_half_width_t(4)) and anytime_interval([0.1, 0.2, 0.3, 0.4]) is None
    paths, n = 4000, np.arange(2, 51)
    x = rng.normal(0.3, 2.0, size=(paths, 50))
    mean = np.cumsum(x, 1)[:, 1:] / n
    sd = np.sqrt((np.cumsum(x**2, 1)[:, 1:] - n * mean**2) / (n - 1))
    error = np.abs(mean - 0.3) / (sd / np.sqrt(n))
    anytime = np.array([anytime_half_width_t(k) for k in n])
    fixed = np.array([t975(k - 1) for k in n])
    assert (error > anytime).any(1).mean() <= 0.05 < 0.2 < (error > fixed).any(1).mean()
    path = list(x[0, :20])  # the vectorised check above is anytime_interval's
    lo, hi = anytime_interval(path)
    assert (lo + hi) / 2 == pytest.approx(np.mean(path)) and (hi - lo) / 2 == pytest.approx(
        anytime[18] * np.std(path, ddof=1) / math.sqrt(20)
    )


def _first_stop(diffs: np.ndarray, margin: float) -> int:
    """The seeds the sequential rule adds one at a time before its interval lies beyond the margin
    (the budget, len(diffs), if it never does)."""
    for k in range(2, len(diffs) + 1):
        if excludes(anytime_interval(list(diffs[:k])), margin):
            return k
    return len(diffs)


def test_the_stopping_rule_stops_early_on_a_large_difference_and_spends_the_budget_on_none():
    rng = np.random.default_rng(1)
    large = [_first_stop(rng.normal(-1.0, 0.8, 50), 0.2) for _ in range(200)]
    assert np.median(large) <= 12 and max(large) < 50
    # no difference: stopping before the budget means the interval excluded the true mean, 0
    none = [_first_stop(rng.normal(0.0, 0.8, 50), 0.2) for _ in range(200)]
    assert np.mean(np.array(none) < 50) <= 0.05
    assert excludes([0.3, 0.5], 0.2) and excludes([-0.5, -0.3], 0.2)
    assert not excludes([0.1, 0.5], 0.2) and not excludes(None, 0.0) and excludes([0.01, 0.5], 0.0)


def _fake_runs(effects: dict[str, float], asked: list[int]):
    """A stand-in for ``arms.run_all``: per seed, the summaries of its runs, the cascade's test error
    ``effects[control]`` below each control's plus noise (seed-determined), chosen at stage 1."""

    def stage(index: int, test: float, epochs: int = 2) -> dict:
        test = float(test)  # as read from a summary.json
        return {"index": index, "val": {"error": test}, "test": {"error": test}, "epochs": epochs}

    def run_all(task, comparison, seeds, *args):
        asked.append(seeds)
        out = []
        for s in range(seeds):
            rng = np.random.default_rng(s)
            base = 0.3 + 0.02 * rng.standard_normal()
            noise = 0.002 * rng.standard_normal(3)
            cascade = base - effects["baseline"] + noise[0]
            stages = [{**stage(0, base), "candidates": []}, {**stage(1, cascade), "candidates": []}]
            runs = {
                cascade_run(s): {"stages": [{**st, "seconds": 1.0} for st in stages], "chosen_stage": 1},
                equal_run(s): {
                    "stages": [{**stage(0, cascade + effects["baseline-equal-epochs"] + noise[1], 4)}]
                },
                extra_run(s, 1): {"stages": [stage(0, cascade + effects["best-of-k"] + noise[2])]},
            }
            for run in runs.values():
                run["stages"] = [{"seconds": 1.0, "candidates": [], **st} for st in run["stages"]]
            out.append(runs)
        return out

    return run_all


def test_a_sequential_comparison_adds_seeds_until_the_named_differences_are_beyond_the_margin(
    tmp_path, monkeypatch
):
    """The cascade is 5 points better than its baseline, as good as the other controls: waiting for
    cascade - baseline stops once the interval is finite; waiting for all spends the budget."""
    asked = []
    effects = {"baseline": 0.05, "baseline-equal-epochs": 0.0, "best-of-k": 0.0}
    monkeypatch.setattr(compare, "run_all", _fake_runs(effects, asked))
    config = RunConfig.from_dict({"train": {"epochs": 2}})
    kw = dict(seeds=2, config=config, until_margin=1.0, max_seeds=9)
    record = run_compare(toy_task(), tmp_path / "one", **kw, until_controls=["baseline"])
    stopping = record["stopping"]
    assert asked == [2, 3, 4, 5] and record["seeds"] == 5 and stopping["looks"] == asked
    assert stopping["stopped"] == "margin excluded" and stopping["undecided"] == []
    assert stopping["margin"] == pytest.approx(0.01) and stopping["controls"] == ["baseline"]
    diff = record["arms"]["baseline"]["cascade_minus_arm"]
    assert diff["cs95"][1] < -0.01 and diff["n"] == 5 and len(record["arms"]["cascade"]["per_seed"]) == 5
    text = (tmp_path / "one" / "compare.md").read_text()
    assert "stopped after 5 seeds: every one's interval lay beyond the margin" in " ".join(text.split())
    assert "| anytime-valid 95 % | detectable |" in text
    asked.clear()
    record = run_compare(toy_task(), tmp_path / "all", **kw, jobs=3, task_factory=toy_task)
    assert asked == [2, 5, 8, 9] and record["seeds"] == 9  # --jobs seeds at a time, up to the budget
    assert record["stopping"]["stopped"] == "seed budget spent"
    assert record["stopping"]["undecided"] == ["baseline-equal-epochs", "best-of-k"]
    # no difference there: after 9 seeds their intervals lie within the margin (a 1-point one)
    assert record["stopping"]["within_margin"] == ["baseline-equal-epochs", "best-of-k"]
    assert "the seed budget was spent (baseline-equal-epochs, best-of-k undecided)" in " ".join(
        (tmp_path / "all" / "compare.md").read_text().split()
    )
    asked.clear()
    plain = run_compare(toy_task(), tmp_path / "plain", seeds=3, config=config, effect=2.0)
    assert asked == [3] and "stopping" not in plain and plain["effect"] == pytest.approx(0.02)
    needed = plain["arms"]["best-of-k"]["cascade_minus_arm"]
    assert "cs95" not in needed and needed["seeds_needed"] == seeds_needed(0.02, needed["std"])
    assert f"best-of-k {needed['seeds_needed']}." in " ".join(
        (tmp_path / "plain" / "compare.md").read_text().split()
    )


def test_a_sequential_comparison_trains_each_run_once(tmp_path, monkeypatch):
    """Every look reads back the seeds it has (``run_all`` resumes): no run is trained twice."""
    calls = []
    real = procedures.run_procedure
    monkeypatch.setattr(
        procedures,
        "run_procedure",
        lambda proc, task, out, **kw: calls.append(out.name) or real(proc, task, out, **kw),
    )
    config = RunConfig.from_dict({"train": {"epochs": 1, "lr": 0.01}, "cascade": {"splits": [2]}})
    record = run_compare(toy_task(), tmp_path, seeds=1, config=config, until_margin=0.0, max_seeds=2)
    assert sorted(calls) == sorted(
        [cascade_run(s) for s in (0, 1)] + [equal_run(s) for s in (0, 1)] + [extra_run(s, 1) for s in (0, 1)]
    )
    assert record["stopping"]["looks"] == [1, 2] and record["stopping"]["stopped"] == "seed budget spent"
    assert record["arms"]["cascade"]["vs_baseline"]["cs95"] is None  # two seeds: not yet finite


def test_bad_stopping_options_are_one_line_before_anything_trains(tmp_path, capsys):
    config = RunConfig.from_dict({"train": {"epochs": 1}})
    for kw, pattern in [
        ({"until_margin": 0.5}, "--until-margin needs --max-seeds"),
        ({"until_margin": 0.5, "max_seeds": 1}, r"at least --seeds \(2\)"),
        ({"until_margin": -1.0, "max_seeds": 5}, "must be 0 or more"),
        ({"max_seeds": 5}, "go with --until-margin"),
        (
            {"until_margin": 0.5, "max_seeds": 5, "until_controls": ["cascade"]},
            r"not a difference .*\(baseline,",
        ),
        ({"effect": 0.0}, "--effect must be positive"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            run_compare(toy_task(), tmp_path / "bad", seeds=2, config=config, **kw)
    assert not (tmp_path / "bad").exists()
    done = cli("compare", "digits", "--seeds", "2", "--until-margin", "0.5", "--out", str(tmp_path / "cli"))
    assert done.returncode != 0 and "--until-margin needs --max-seeds" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()
    only = [
        "compare",
        "digits",
        "--seeds",
        "1",
        "--only",
        "cascade-seed0",
        "--effect",
        "0.5",
        "--out",
        str(tmp_path / "cli"),
    ]
    assert main(only) == 1
    assert (
        capsys.readouterr().err
        == "topdown: error: --only writes no compare.*, so --effect cannot apply; drop it\n"
    )
    assert not (tmp_path / "cli").exists()


def test_a_compare_json_written_before_detectable_still_renders():
    committed = ROOT / "bench" / "results" / "digits-compare-demo-full-budget"
    record = json.loads((committed / "compare.json").read_text())
    assert "detectable" not in record["arms"]["cascade"]["vs_baseline"]
    text = render(record)
    assert "| forgetting | 1.88 ± 0.41 | -0.22 [-0.45, 0.00] | - | 0.064 | 9/3 | 55.4 | 4.3 |" in text
    assert "| best-of-k | 0.21 [0.00, 0.42] | - | 0.055 | 2/8 |" in text  # cascade − control
    assert "Sequential" not in text and "Seeds needed" not in text
