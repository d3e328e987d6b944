"""The Lightning adapter: a LightningModule through a three-stage cascade, one Trainer.fit per
stage; frozen blocks (parameters and BatchNorm statistics) untouched by Lightning, the
optimizer refused if it holds a frozen parameter, acceptance on what validation logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

pytest.importorskip("lightning")  # a guard only: CI installs the extra, so this module runs there
import lightning as L  # noqa: E402
from conftest import PYTHONPATH, ROOT, assert_ranks_hold_the_run, read_summary, stage_table, toy_data  # noqa: E402

import topdown  # noqa: E402
from topdown import distributed  # noqa: E402
from topdown.adapters.lightning import _renamed, default_test_monitor, fit_plan  # noqa: E402
from topdown.errors import TopdownError  # noqa: E402

# Lightning's advice for real data loaders, and its own use of a torch API torch now deprecates
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:{m}")
    for m in (
        ".*does not have many workers",
        ".*number of training batches",
        ".*isinstance.treespec, LeafSpec.",
    )
]

BLOCKS = [("inp", ["inp"]), ("mid", ["mid"]), ("out", ["out"])]


class LitNet(L.LightningModule):
    """A small MLP with BatchNorm in its two lower blocks and dropout in the middle one."""

    def __init__(self, all_parameters: bool = False):
        super().__init__()
        self.all_parameters = all_parameters
        self.inp = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.mid(self.inp(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def _error(self, batch, name):
        x, y = batch
        logits = self(x)
        self.log(f"{name}_error", (logits.argmax(1) != y).float().mean())
        self.log(f"{name}_loss", F.cross_entropy(logits, y))

    def validation_step(self, batch, batch_idx):
        self._error(batch, "val")

    def test_step(self, batch, batch_idx):
        self._error(batch, "test")

    def configure_optimizers(self):
        params = (
            self.parameters() if self.all_parameters else filter(lambda p: p.requires_grad, self.parameters())
        )
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def loaders():
    x, y = toy_data()

    def make(a, b, shuffle=False):
        return DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=32, shuffle=shuffle)

    return dict(
        train_dataloaders=make(0, 128, True), val_dataloaders=make(128, 160), test_dataloaders=make(160, 192)
    )


def trainer(callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def new_plan(out, module=LitNet, plan=topdown.Cascade, **kw) -> topdown.Plan:
    torch.manual_seed(0)
    return plan(module(), BLOCKS, build_model=module, metric="error", out=out, **kw)


class Unpin(L.Callback):
    """What a careless callback (or Lightning restoring modes it captured) may do: put every
    module in training mode by assignment, bypassing the plan's pinned ``train``."""

    def on_train_epoch_start(self, trainer, pl_module):
        for m in pl_module.modules():
            m.training = True


class Watch(L.Callback):
    """Snapshots a stage's frozen state when the stage is handed out, checks it after fit."""

    def __init__(self, stage):
        model = stage.model
        self.stage = stage
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = {
            n: b.clone() for n, b in model.named_buffers() if n.split(".")[0] in stage.frozen_blocks
        }
        self.batches = 0

    def on_train_start(self, trainer, pl_module):
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        assert in_optimizer == {id(p) for p in self.stage.trainable_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        for block in self.stage.frozen_blocks:
            assert all(not m.training for m in getattr(pl_module, block).modules()), block
        for block in self.stage.trained_blocks:
            assert all(m.training for m in getattr(pl_module, block).modules()), block

    def on_fit_end(self, trainer, pl_module):
        assert self.batches == 8  # 2 epochs of 4 batches
        assert self.frozen.keys() == {
            n for n, p in pl_module.named_parameters() if n.split(".")[0] in self.stage.frozen_blocks
        }
        assert all(
            torch.equal(p, self.frozen[n]) for n, p in pl_module.named_parameters() if n in self.frozen
        )
        assert all(
            torch.equal(b, self.buffers[n]) for n, b in pl_module.named_buffers() if n in self.buffers
        )  # BatchNorm statistics
        self.checked = True


def test_a_lightning_module_runs_a_cascade_with_frozen_blocks_bit_identical(tmp_path):
    plan, watches = new_plan(tmp_path / "run"), []

    def factory(stage):
        watches.append(Watch(stage))
        return trainer(
            [Unpin(), watches[-1]]
        )  # our callback runs after both: frozen modules are back in eval mode

    summary = fit_plan(plan, factory, monitor="val_error", **loaders())
    assert [w.stage.trained_blocks for w in watches] == [["inp", "mid", "out"], ["inp", "mid"], ["inp"]]
    assert all(getattr(w, "checked", False) for w in watches)
    assert summary == read_summary(tmp_path / "run") and summary["status"] == "complete"
    best = None
    for s in summary["stages"]:
        assert s["epochs"] == 2 and set(s["val"]) == {"error", "loss"} and set(s["test"]) == {"error", "loss"}
        assert s["accepted"] == (
            best is None or s["val"]["error"] < best
        )  # a cascade stage must beat the chosen model
        best = s["val"]["error"] if s["accepted"] else best
    assert summary["test"] == summary["stages"][summary["chosen_stage"]]["test"]
    # metrics.jsonl as our loop writes it: one line per epoch; the last epoch's validation is the stage's
    lines = topdown.runs.RunDir(tmp_path / "run").read_metrics()
    assert [(r["stage"], r["epoch"]) for r in lines] == [(i, e) for i in range(3) for e in (1, 2)]
    assert all(
        r["lr"] == 0.1 and r["train_loss"] > 0 and r["seconds"] > 0 and set(r["val"]) == {"error", "loss"}
        for r in lines
    )
    assert [r["val"] for r in lines if r["epoch"] == 2] == [
        pytest.approx(s["val"]) for s in summary["stages"]
    ]
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file() and (
        tmp_path / "run" / "report.md"
    ).is_file()
    # the validation metric recorded is the one of the weights the plan saved
    stage_1 = topdown.files.load_tensors(tmp_path / "run" / "checkpoints" / "stage-1.safetensors")[0]
    model = LitNet()
    model.load_state_dict(stage_1)
    x, y = toy_data()
    with torch.no_grad():
        assert (model.eval()(x[128:160]).argmax(1) != y[128:160]).float().mean().item() == pytest.approx(
            summary["stages"][1]["val"]["error"]
        )


def test_an_optimizer_over_all_parameters_is_refused_in_one_line_and_the_run_resumes(tmp_path):
    plan = new_plan(tmp_path / "run", module=lambda: LitNet(all_parameters=True))
    with pytest.raises(topdown.ConfigError) as error:
        fit_plan(plan, lambda stage: trainer(), monitor="val_error", **loaders())
    message = str(error.value)
    assert (
        "\n" not in message
        and message.startswith("stage 1 (cascade)")
        and "filter(lambda p: p.requires_grad" in message
    )
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and len(summary["stages"]) == 1  # stage 0 (all trainable) was fine
    # fixed, the run continues from stage 1
    summary = fit_plan(
        new_plan(tmp_path / "run", resume=True), lambda stage: trainer(), monitor="val_error", **loaders()
    )
    assert summary["status"] == "complete" and len(summary["stages"]) == 3


def test_a_missing_monitor_names_what_validation_logged_after_the_first_epoch(tmp_path):
    plan = new_plan(tmp_path / "run")
    with pytest.raises(topdown.ConfigError, match=r"logged \['val_error', 'val_loss'\], not 'val_wer'"):
        fit_plan(
            plan,
            lambda stage: L.Trainer(
                max_epochs=5,
                accelerator="cpu",
                devices=1,
                enable_progress_bar=False,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
            ),
            monitor="val_wer",
            **loaders(),
        )
    assert (
        tmp_path / "run" / "metrics.jsonl"
    ).exists() is False  # said after the first epoch, before any was logged


def test_docs_lightning_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(docs_example(), "docs/trainers.md", "exec"), {})
    summary = read_summary(tmp_path / "runs" / "lightning")
    assert summary["status"] == "complete" and [s["epochs"] for s in summary["stages"]] == [3, 3, 3]
    assert set(summary["test"]) == {"error"}


def docs_example() -> str:
    section = (ROOT / "docs" / "trainers.md").read_text().split("## PyTorch Lightning", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_example_with_ddp_on_two_cpu_processes_has_one_writer_and_resumes_after_a_rank_dies(
    tmp_path,
):
    """The example with devices=2, strategy="ddp": Lightning runs the script again as rank 1, which
    builds the plan before any process group exists; rank 0 built it before it knew there would be
    two processes. Each rank saves its model after every stage (tests/jobs/ranks.py). Rank 1 dies
    after stage 1: Lightning's main process (rank 0) sees it and is killed too, a non-zero exit; the
    finished stages stay, and the example with resume=True continues the run to its end."""
    dumps, run = tmp_path / "dumps", tmp_path / "runs" / "lightning"
    code = docs_example().replace('accelerator="cpu",', 'accelerator="cpu", devices=2, strategy="ddp",')
    assert 'strategy="ddp"' in code

    def example(kill: tuple[int, int] | None, resume: bool) -> subprocess.CompletedProcess:
        script = tmp_path / "example.py"
        script.write_text(
            f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom pathlib import Path\n"
            f"from jobs.ranks import dump_stages\ndump_stages(Path({str(dumps)!r}), {kill!r})\n"
            + code.replace('out="runs/lightning",', f'out="runs/lightning", resume={resume},')
        )
        return subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )

    killed = example((1, 1), resume=False)
    assert killed.returncode != 0
    before = read_summary(run)
    # "failed" where rank 0 saw its peer gone (an error in a collective) before Lightning's watcher stopped it
    assert before["status"] in ("running", "failed") and before["provenance"]["world_size"] == 2
    kept = {i: (run / "checkpoints" / f"stage-{i}.safetensors").read_bytes() for i in (0, 1)}

    resumed = example(None, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = read_summary(run)
    assert summary["status"] == "complete" and [r["world_size"] for r in summary["resumed_on"]] == [2]
    assert stage_table(summary) == [
        (0, "baseline", ["hidden1", "hidden2", "output"], 3),
        (1, "cascade", ["hidden1", "hidden2"], 3),
        (2, "cascade", ["hidden1"], 3),
    ]
    assert summary["stages"][:2] == before["stages"][:2] == before["stages"]
    assert all((run / "checkpoints" / f"stage-{i}.safetensors").read_bytes() == kept[i] for i in kept)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in epochs] == [0] * 3 + [1] * 3 + [2] * 3  # an epoch a line, from rank 0 only
    assert_ranks_hold_the_run(run, dumps, [0, 1, 2])


def test_a_run_of_two_processes_continued_by_one_is_refused_before_it_trains(tmp_path, monkeypatch):
    """Lightning's main process cannot know how many processes its fit will start when the plan is
    built: the check waits for the fit to start, and comes before any epoch is trained."""
    run = tmp_path / "run"
    fit_plan(new_plan(run), lambda stage: trainer(), monitor="val_error", **loaders())
    summary = read_summary(run)  # as two processes would leave it, killed in stage 2
    summary["status"], summary["provenance"]["world_size"] = "running", 2
    summary["stages"].pop()
    (run / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(distributed, "_fixed", False)  # as in a new process: nothing fixed the count yet
    with pytest.raises(TopdownError, match=r"trained by 2 process\(es\) and this command has 1; resume with"):
        fit_plan(new_plan(run, resume=True), lambda stage: trainer(), monitor="val_error", **loaders())
    after = read_summary(run)
    assert after["stages"] == summary["stages"] and after["status"] == "failed"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 4 and {e["stage"] for e in epochs} == {0, 1}  # stage 2 trained no epoch


def test_transfer_classifier_stages_get_their_subset_from_a_function_of_the_stage(tmp_path):
    config = topdown.RunConfig(procedure=topdown.ProcedureConfig(split=1, subset=0.5))
    data = loaders()
    with pytest.raises(topdown.ConfigError, match="as a function of the stage"):
        fit_plan(
            new_plan(tmp_path / "a", plan=topdown.TransferClassifier, config=config),
            lambda stage: trainer(),
            monitor="val_error",
            **data,
        )
    train = data.pop("train_dataloaders").dataset
    sizes = []

    def train_dataloaders(stage):
        sizes.append(int(stage.subset * len(train)))
        return DataLoader(Subset(train, range(sizes[-1])), batch_size=32, shuffle=True)

    summary = fit_plan(
        new_plan(tmp_path / "b", plan=topdown.TransferClassifier, config=config),
        lambda stage: trainer(),
        monitor="val_error",
        train_dataloaders=train_dataloaders,
        **data,
    )
    assert sizes == [128, 64, 64] and [s["role"] for s in summary["stages"]] == [
        "full-data baseline",
        "subset baseline",
        "transfer",
    ]


def test_a_test_metric_logged_under_another_name_is_an_error_not_an_empty_column():
    for val, test in (
        ("val_error", "test_error"),
        ("valid/error", "test/error"),
        ("validation.error", "test.error"),
        ("val-error", "test-error"),
        ("validity", None),
        ("error", None),
    ):
        assert default_test_monitor(val) == test
    assert _renamed({"test_error": 0.25, "test_loss": 1.0}, "test_error", "error", validation=False) == {
        "error": 0.25,
        "loss": 1.0,
    }
    with pytest.raises(
        topdown.ConfigError, match=r"the test metrics logged \(test_err\) lack 'test_error': .*test_monitor="
    ):
        _renamed({"test_err": 0.25}, "test_error", "error", validation=False)
