"""The transformers.Trainer recipe of docs/trainers.md: each stage one Trainer(...).train() with an
optimizer over exactly the stage's trainable parameters; frozen blocks untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip(
    "transformers"
)  # not in CI (docs/trainers.md says why); pip install "topdown[hf]"
pytest.importorskip("accelerate")  # the Trainer needs it

from conftest import read_summary, toy_data  # noqa: E402

import topdown  # noqa: E402

BLOCKS = [("inp", ["inp"]), ("mid", ["mid"]), ("out", ["out"])]


class Net(nn.Module):
    """A plain nn.Module that returns what the Trainer expects: a dict with ``loss`` and ``logits``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.out = nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.out(self.mid(self.inp(x)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def error(prediction):
    return {"error": float((prediction.predictions.argmax(-1) != prediction.label_ids).mean())}


def test_a_transformers_trainer_drives_a_cascade(tmp_path):
    x, y = toy_data()
    train, val, test = Rows(x[:128], y[:128]), Rows(x[128:160], y[128:160]), Rows(x[160:], y[160:])
    torch.manual_seed(0)
    plan = topdown.Cascade(Net(), BLOCKS, build_model=Net, metric="error", out=tmp_path / "run")
    for stage in plan:
        frozen = {n: p.detach().clone() for n, p in stage.model.named_parameters() if not p.requires_grad}
        buffers = {
            n: b.clone() for n, b in stage.model.named_buffers() if n.split(".")[0] in stage.frozen_blocks
        }
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "hf" / str(stage.index)),
            num_train_epochs=2,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=32,
            learning_rate=0.01,
            seed=stage.seed % 2**32,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        optimizer = torch.optim.AdamW(stage.trainable_parameters(), lr=args.learning_rate)
        trainer = transformers.Trainer(
            model=stage.model,
            args=args,
            train_dataset=train,
            eval_dataset=val,
            compute_metrics=error,
            optimizers=(optimizer, None),
        )
        result = trainer.train()
        assert all(torch.equal(p, frozen[n]) for n, p in stage.model.named_parameters() if n in frozen)
        assert all(
            torch.equal(b, buffers[n]) for n, b in stage.model.named_buffers() if n in buffers
        )  # BatchNorm statistics
        val_metrics = trainer.evaluate()
        test_metrics = trainer.evaluate(test, metric_key_prefix="test")
        stage.finish(
            val={"error": val_metrics["eval_error"], "loss": val_metrics["eval_loss"]},
            test={"error": test_metrics["test_error"], "loss": test_metrics["test_loss"]},
            epochs=round(result.metrics["epoch"]),
        )
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "complete" and [s["epochs"] for s in summary["stages"]] == [2, 2, 2]
    assert [s["trained_blocks"] for s in summary["stages"]] == [
        ["inp", "mid", "out"],
        ["inp", "mid"],
        ["inp"],
    ]
