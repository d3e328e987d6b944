"""The transformers.Trainer recipe of docs/trainers.md: each stage one Trainer(...).train() with an
optimizer over exactly the stage's trainable parameters; frozen blocks untouched. Its runnable
example (examples/hf_trainer.py) in one process and under torchrun with two (CPU, gloo)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers  # the hf extra, installed in CI
from conftest import (
    ACCELERATE,
    ROOT,
    TORCHRUN,
    assert_ranks_hold_the_run,
    launch,
    read_summary,
    stage_table,
    toy_data,
)
from torch import nn
from torch.nn import functional as F

import topdown
from topdown import distributed
from topdown.errors import TopdownError

EXAMPLE = ROOT / "examples" / "hf_trainer.py"
_spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
EXAMPLE_STAGES = [
    (0, "baseline", ["embeddings", "layer0", "layer1", "head"], 1),
    (1, "cascade", ["embeddings", "layer0", "layer1"], 1),
    (2, "cascade", ["embeddings", "layer0"], 1),
    (3, "cascade", ["embeddings"], 1),
]

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


def test_the_example_runs_in_one_process(tmp_path):
    summary = example.main(["--out", str(tmp_path / "run"), "--epochs", "1"])
    assert summary["status"] == "complete" and stage_table(summary) == EXAMPLE_STAGES
    assert read_summary(tmp_path / "run")["provenance"]["world_size"] == 1


def test_the_example_in_two_processes_survives_a_dying_rank_and_resumes_with_as_many(tmp_path, monkeypatch):
    """Two processes, whose plan is built before the Trainer creates the process group: one writer,
    ranks that agree. Rank 1 dies after stage 0; torchrun brings rank 0 down, stage 0 stays. One
    process may not continue the run (refused once it knows it is alone: at its first stage's end);
    two do, from what rank 0 saved, here started by `accelerate launch`."""
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    ranks = [str(ROOT / "tests" / "jobs" / "ranks.py"), str(dumps)]
    args = [str(EXAMPLE), "--out", str(run), "--epochs", "1"]
    killed = launch(TORCHRUN, *ranks, "--kill", "1:0", *args)
    assert killed.returncode != 0
    before = read_summary(run)
    # "failed" where rank 0 saw its peer gone before torchrun stopped it
    assert before["status"] in ("running", "failed") and before["provenance"]["world_size"] == 2
    assert stage_table(before) == EXAMPLE_STAGES[:1]

    monkeypatch.setattr(distributed, "_fixed", False)  # as in a new process: nothing fixed the count yet
    with pytest.raises(TopdownError, match=r"trained by 2 process\(es\) and this command has 1; resume with"):
        example.main([*args[1:], "--resume"])
    assert read_summary(run)["stages"] == before["stages"]

    resumed = launch(ACCELERATE, *ranks, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        resumed.stdout.count("chosen stage") == 1
    )  # rank 0 speaks (and alone writes: else the lock refuses)
    summary = read_summary(run)
    assert summary["status"] == "complete" and stage_table(summary) == EXAMPLE_STAGES
    assert summary["stages"][0] == before["stages"][0]
    assert [r["world_size"] for r in summary["resumed_on"]] == [None, 2]  # the refused one recorded none
    assert_ranks_hold_the_run(run, dumps, [1, 2, 3])
