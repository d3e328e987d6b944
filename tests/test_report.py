"""report: the learning-curve plot."""

import warnings

import pytest
from matplotlib.figure import Figure

from topdown import report


def curves_of(losses):
    summary = {
        "task": "image",
        "procedure": "baseline",
        "metric": "error",
        "stages": [{"index": 0, "role": "baseline", "candidates": []}],
    }
    metrics = [
        {"stage": 0, "candidate": 0, "epoch": i + 1, "val": {"error": 0.0}, "train_loss": v}
        for i, v in enumerate(losses)
    ]
    return summary, metrics


@pytest.mark.parametrize("losses", [[0.0, 0.0], [0.5, 0.0], [0.5, -0.1], [0.5, 0.2]])
def test_curves_plot_raises_no_warning_for_zero_or_negative_training_loss(tmp_path, monkeypatch, losses):
    """A one-class corpus trains to loss 0: the log-scaled loss plot warned on stderr ("Data has no
    positive values"). Positive losses keep the log scale; any other loss makes the plot linear."""
    scales, savefig = [], Figure.savefig
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda fig, *a, **k: (scales.append(fig.axes[1].get_yscale()), savefig(fig, *a, **k)),
    )
    summary, metrics = curves_of(losses)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.plot_curves(summary, metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert scales == ["log" if min(losses) > 0 else "linear"]


def test_a_stage_in_progress_is_shown_with_its_budget_and_the_time_the_rest_takes():
    from topdown.report import _stage_progress

    lines = [
        {"stage": 1, "candidate": 0, "epoch": 1, "seconds": 60.0, "max_epochs": 40},
        {"stage": 1, "candidate": 0, "epoch": 2, "seconds": 180.0, "max_epochs": 40},
    ]  # the last epoch took 120 s
    assert _stage_progress(1, lines) == "stage 1, epoch 2 of 40, at most 1.3 h left in it"  # 38 x 120 s
    assert (
        _stage_progress(
            1, [*lines, {"stage": 1, "candidate": 1, "epoch": 1, "seconds": 90.0, "max_epochs": 40}]
        )
        == "stage 1 (candidate 2), epoch 1 of 40, at most 1.0 h left in it"
    )
    assert _stage_progress(2, []) == "stage 2, starting"
    # the median of the last five epochs' durations: one slow epoch (here 600 s) does not move it
    steady = [
        {
            "stage": 0,
            "epoch": e,
            "seconds": 60.0 * e + (540 if e == 7 else 0) + (540 if e > 7 else 0),
            "max_epochs": 67,
        }
        for e in range(1, 10)
    ]
    assert _stage_progress(0, steady) == "stage 0, epoch 9 of 67, at most 1.0 h left in it"  # 58 x 60 s
