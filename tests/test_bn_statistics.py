"""bench/bn_statistics.py: a run's stages evaluated with BatchNorm's running statistics (as validation
measured them) and with each batch's own, without touching the model's statistics."""

from __future__ import annotations

import sys

import torch
from conftest import ROOT, read_summary

from topdown.cli import main as topdown

sys.path.insert(0, str(ROOT / "bench"))
import bn_statistics  # noqa: E402


def test_the_copy_normalises_by_the_batch_and_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    model[1].running_mean.fill_(5.0)  # stale: far from any batch's mean
    model.train()
    copy = bn_statistics.with_batch_statistics(model)
    x = torch.randn(16, 3)
    with torch.no_grad():
        out = copy(x)
    assert copy[1].training and not copy[2].training  # BatchNorm on the batch, dropout off
    assert torch.allclose(out.mean(0), copy[1].bias, atol=1e-5)  # each feature centred on the batch
    assert torch.equal(model[1].running_mean, torch.full((4,), 5.0)) and model.training


def test_each_stage_of_a_run_twice_the_running_column_as_validation_measured_it(
    tmp_path, capsys, monkeypatch
):
    run = tmp_path / "sp"
    topdown(["run", "shrink-perturb", "image", "--preset", "tiny", "--out", str(run)])
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["bn_statistics.py", str(run)])
    bn_statistics.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    stages = read_summary(run)["stages"]
    assert [int(r[0]) for r in rows] == [s["index"] for s in stages]
    for row, stage in zip(rows, stages):
        assert row[1].strip() == stage["role"]
        assert float(row[2]) == round(stage["val"]["error"], 4)  # the model validation judged
        assert 0.0 <= float(row[3]) <= 1.0
