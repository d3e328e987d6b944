"""The training loop's schedule: warm-up per step, plateau decay and early stopping per epoch."""

import pytest
import torch
from conftest import toy_task

import topdown.loop as loop
from topdown import ConfigError, TrainConfig
from topdown.best_epochs import average_weights
from topdown.files import load_tensors, save_tensors
from topdown.loop import fit
from topdown.schedule import LrSchedule


def recorded_lrs(monkeypatch, cfg: TrainConfig, task=None) -> list[float]:
    lrs = []
    real = loop.make_optimizer

    def spy(params, c):
        opt = real(params, c)
        step = opt.step
        opt.step = lambda *a, **k: (lrs.append(opt.param_groups[0]["lr"]), step(*a, **k))[1]
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    task = task or toy_task()
    torch.manual_seed(0)
    fit(task.build_model(), task, cfg, seed=0)
    return lrs


def test_warmup_ramps_the_lr_per_step(monkeypatch):
    lrs = recorded_lrs(monkeypatch, TrainConfig(epochs=2, lr=0.01, warmup_steps=6))
    assert len(lrs) == 8  # 128 examples, batches of 32, two epochs
    assert lrs[:6] == pytest.approx([0.01 * (i + 1) / 6 for i in range(6)])
    assert lrs[6:] == pytest.approx([0.01, 0.01])


def test_plateau_decay_and_early_stop(monkeypatch):
    script = [0.5, 0.6, 0.6, 0.6, 0.6]  # validation never improves after epoch 1
    cfg = TrainConfig(epochs=10, lr=0.01, lr_decay=0.5, lr_patience=1, early_stop=3)
    lrs = recorded_lrs(monkeypatch, cfg, toy_task(metric_script=script))
    per_epoch = lrs[::4]  # 4 batches an epoch
    assert per_epoch == pytest.approx(
        [0.01, 0.01, 0.005, 0.0025]
    )  # decays after each epoch without improvement
    task = toy_task(metric_script=script)
    torch.manual_seed(0)
    result = fit(task.build_model(), task, cfg, seed=0)
    assert result.epochs == 4 and result.val["error"] == 0.5  # stopped 3 epochs after the best; best restored


def test_bf16_autocast_trains(monkeypatch):
    """train.amp=bf16 runs the training forward under autocast (here on CPU; on CUDA the same)."""
    task = toy_task()
    dtypes = []
    loss = task.loss
    task.loss = lambda model, batch: (dtypes.append(model.out(torch.zeros(1, 16)).dtype), loss(model, batch))[
        1
    ]
    torch.manual_seed(0)
    result = fit(task.build_model(), task, TrainConfig(epochs=1, lr=0.01, amp="bf16"), seed=0)
    assert set(dtypes) == {torch.bfloat16} and 0 <= result.val["error"] <= 1
    with pytest.raises(ConfigError, match="train.amp"):
        fit(task.build_model(), task, TrainConfig(amp="fp8"), seed=0)


def test_bad_schedule_values_are_errors():
    task = toy_task()
    with pytest.raises(ConfigError, match="warmup_steps"):
        fit(task.build_model(), task, TrainConfig(warmup_steps=-1), seed=0)
    with pytest.raises(ConfigError, match="train.optimizer is 'lion'; allowed: one of 'adam'"):
        fit(task.build_model(), task, TrainConfig(optimizer="lion"), seed=0)
    with pytest.raises(ConfigError, match="lack .bleu. .the task.s metric, or train.monitor"):
        fit(task.build_model(), task, TrainConfig(epochs=1, monitor="bleu"), seed=0)


def test_what_a_task_hands_the_loop_is_checked_with_a_one_line_error():
    import dataclasses

    task = toy_task()
    as_float = dataclasses.replace(task, loss=lambda model, batch: task.loss(model, batch).detach().item())
    with pytest.raises(
        ConfigError, match=r"^task toy: loss\(model, batch\) must return a one-element tensor .*got float$"
    ):
        fit(task.build_model(), as_float, TrainConfig(epochs=1), seed=0)
    shaped = dataclasses.replace(
        task, loss=lambda model, batch: task.loss(model, batch).reshape(1)
    )  # one element: a loss
    assert 0 <= fit(task.build_model(), shaped, TrainConfig(epochs=1), seed=0).val["error"] <= 1
    scalar = dataclasses.replace(task, evaluate=lambda model, split: 0.5)
    with pytest.raises(
        ConfigError, match=r"^task toy: evaluate\(model, 'val'\) must return a dict of metrics .*got float$"
    ):
        fit(task.build_model(), scalar, TrainConfig(epochs=1), seed=0)
    with pytest.raises(
        ConfigError,
        match=r"^task toy: train_batches must take 2 positional argument\(s\), "
        r"as train_batches\(generator, subset\)",
    ):
        dataclasses.replace(task, train_batches=lambda generator: [])


def test_onecycle_and_cosine_are_pure_functions_of_the_step(monkeypatch):
    """train.schedule=onecycle/cosine: the lr of every step follows LrSchedule.lr over the stage's
    planned steps (epochs x batches), and validation plateaus do not decay it."""
    script = [0.5, 0.6, 0.6, 0.6]  # plateaus that would halve a plateau schedule's lr
    for schedule in ("onecycle", "cosine"):
        cfg = TrainConfig(epochs=4, lr=0.01, schedule=schedule, warmup_steps=2 if schedule == "cosine" else 0)
        lrs = recorded_lrs(monkeypatch, cfg, toy_task(metric_script=script))
        assert lrs == pytest.approx(
            [LrSchedule(cfg, 16).lr(s, 0.01) for s in range(16)]
        )  # 4 batches x 4 epochs
        assert max(lrs) == pytest.approx(0.01, rel=0.05) and lrs[-1] < 0.01 * 0.05
    onecycle = TrainConfig(lr=0.01, schedule="onecycle")
    assert LrSchedule(onecycle, 100).lr(0, 0.01) == pytest.approx(0.01 / 25)
    assert LrSchedule(onecycle, 100).lr(30, 0.01) == pytest.approx(0.01)
    assert LrSchedule(onecycle, 100).lr(99, 0.01) == pytest.approx(0.01 / 25 / 1e4)
    with pytest.raises(ConfigError, match="train.schedule"):
        TrainConfig(schedule="step")


def test_scheduled_stage_resumes_bit_for_bit(tmp_path):
    """The schedule needs no state of its own: a stage interrupted during epoch 3 and resumed
    ends with the weights of an uninterrupted one."""
    task = toy_task()
    cfg = TrainConfig(epochs=3, lr=0.01, schedule="onecycle")
    torch.manual_seed(0)
    full = task.build_model()
    fit(full, task, cfg, seed=0)
    torch.manual_seed(0)
    interrupted = task.build_model()
    calls = {"n": 0}
    real = task.evaluate

    def evaluate(model, split):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, split)

    task.evaluate = evaluate
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, task, cfg, seed=0, resume_path=tmp_path / "r3.safetensors")
    task.evaluate = real
    assert (tmp_path / "r3.safetensors").is_file()  # two epochs' resume point
    torch.manual_seed(0)
    resumed = task.build_model()
    steps, loss = [], task.loss
    task.loss = lambda model, batch: steps.append(1) or loss(model, batch)
    fit(resumed, task, cfg, seed=0, resume_path=tmp_path / "r3.safetensors")
    assert len(steps) == sum(1 for _ in task.train_batches(torch.Generator(), 1.0))  # one epoch, the third
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_min_epoch_steps_passes_a_small_training_set_again(monkeypatch):
    """train.min_epoch_steps: an epoch of a 4-batch training set with a minimum of 10 steps is
    three passes (12 steps), each reshuffled; a schedule plans over those steps; 0 is one pass."""
    cfg = TrainConfig(epochs=2, lr=0.01, min_epoch_steps=10, schedule="onecycle")
    lrs = recorded_lrs(monkeypatch, cfg)
    assert len(lrs) == 24  # 2 epochs x 3 passes x 4 batches
    assert lrs == pytest.approx([LrSchedule(cfg, 24).lr(s, 0.01) for s in range(24)])
    assert len(recorded_lrs(monkeypatch, TrainConfig(epochs=2, lr=0.01, min_epoch_steps=0))) == 8
    assert (
        len(recorded_lrs(monkeypatch, TrainConfig(epochs=2, lr=0.01, min_epoch_steps=4))) == 8
    )  # already 4 steps a pass
    passes = list(loop.epoch_batches(toy_task(), cfg, torch.Generator().manual_seed(0), 1.0))
    assert len(passes) == 12 and not torch.equal(passes[0][1], passes[4][1])  # the second pass is reshuffled
    with pytest.raises(ConfigError, match="min_epoch_steps"):
        TrainConfig(min_epoch_steps=-1)


def _fit_recording_weights(
    cfg: TrainConfig, script: list[float], resume_path=None, fail_at: int | None = None
):
    """Fit the toy task with a scripted validation metric; returns the model and the weights each
    validation call saw (``fail_at``: the k-th call is interrupted)."""
    task = toy_task(metric_script=script)
    seen = []
    real = task.evaluate

    def evaluate(model, split):
        if split == "val":
            if len(seen) + 1 == fail_at:
                raise KeyboardInterrupt
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, split)

    task.evaluate = evaluate
    torch.manual_seed(0)
    model = task.build_model()
    return model, fit(model, task, cfg, seed=0, resume_path=resume_path), seen


def test_average_best_keeps_the_average_of_the_best_epochs_unless_worse():
    """train.average_best=2: the stage ends with the mean of its two best epochs' weights (here
    epochs 4 and 2) when validation finds the average no worse than the best epoch; else the best."""
    cfg = TrainConfig(epochs=4, lr=0.01, average_best=2)
    model, result, seen = _fit_recording_weights(cfg, [0.5, 0.4, 0.45, 0.3, 0.3])
    assert len(seen) == 5 and result.val["error"] == 0.3  # 4 epochs, then the average
    expected = average_weights([seen[3], seen[1]])
    for name, value in model.state_dict().items():
        assert torch.allclose(value, expected[name]) and torch.equal(seen[4][name], value)
    model, result, seen = _fit_recording_weights(cfg, [0.5, 0.4, 0.45, 0.3, 0.35])  # the average is worse
    assert result.val["error"] == 0.3
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen[3][name])  # epoch 4, the best
    assert average_weights(
        [
            {"n": torch.tensor(3), "w": torch.tensor([1.0, 2.0])},
            {"n": torch.tensor(5), "w": torch.tensor([3.0, 6.0])},
        ]
    ) == {"n": 3, "w": pytest.approx([2.0, 4.0])}
    frozen = torch.rand(
        1000
    )  # the same in every kept epoch: kept bit for bit, where (x + x + x) / 3 may not be x
    assert torch.equal(average_weights([{"w": frozen.clone()} for _ in range(3)])["w"], frozen)
    with pytest.raises(ConfigError, match="average_best"):
        TrainConfig(average_best=0)


def test_average_best_resumes_to_the_same_weights(tmp_path):
    script = [0.5, 0.4, 0.45, 0.3, 0.3]
    cfg = TrainConfig(epochs=4, lr=0.01, average_best=3)
    full, _, _ = _fit_recording_weights(cfg, script)
    with pytest.raises(KeyboardInterrupt):  # during epoch 4's validation: epochs 1-3 kept in the resume point
        _fit_recording_weights(cfg, script, resume_path=tmp_path / "r.safetensors", fail_at=4)
    resumed, result, _ = _fit_recording_weights(cfg, script[3:], resume_path=tmp_path / "r.safetensors")
    assert result.epochs == 4
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_resume_point_of_the_earlier_format_resumes_to_the_same_weights(tmp_path):
    """Before kept[0] held the best epoch, a resume point stored it under "best." with no "kept"
    list; runs interrupted then must still resume exactly."""
    script = [0.5, 0.4, 0.45, 0.3, 0.3]
    cfg = TrainConfig(epochs=4, lr=0.01)
    full, _, seen = _fit_recording_weights(cfg, script)
    path = tmp_path / "r.safetensors"
    with pytest.raises(KeyboardInterrupt):  # during epoch 3's validation: epoch 2 is the best so far
        _fit_recording_weights(cfg, script, resume_path=path, fail_at=3)
    tensors, meta = load_tensors(path)
    assert [epoch for _, epoch in meta["kept"]] == [2]
    old = {("best." + k[len("kept0.") :] if k.startswith("kept0.") else k): v for k, v in tensors.items()}
    save_tensors(path, old, {**meta, "kept": []})
    resumed, result, _ = _fit_recording_weights(cfg, script[2:], resume_path=path)
    assert result.epochs == 4 and result.val["error"] == 0.3
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    save_tensors(path, old, {**meta, "kept": []})  # again, now with worse epochs 3 and 4 to come
    resumed, result, _ = _fit_recording_weights(cfg, [0.45, 0.6, 0.6], resume_path=path)
    assert result.val["error"] == 0.4  # the best epoch, 2, restored from "best."
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, seen[1][name])


# -- the kept epoch: ranked by the task's metric, whatever train.monitor watches ------------------


def test_the_kept_epoch_is_the_best_by_the_tasks_metric_even_when_train_monitor_is_the_loss():
    """train.monitor=loss drives lr decay and early stopping; the weights the stage ends with are
    those of the epoch with the best task metric (which decides acceptance), not the lowest loss."""
    errors, losses = [0.5, 0.3, 0.4, 0.45], [0.9, 0.8, 0.7, 0.6]  # they disagree: epoch 2 vs 4
    cfg = TrainConfig(epochs=4, lr=0.01, monitor="loss", lr_patience=1)
    task = toy_task(metric_script=errors, loss_script=losses)
    records, seen, real = [], [], task.evaluate

    def evaluate(model, split):
        if split == "val":
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, split)

    task.evaluate = evaluate
    torch.manual_seed(0)
    model = task.build_model()
    result = fit(model, task, cfg, seed=0, on_epoch=records.append)
    assert result.kept_epoch == 2 and result.val["error"] == 0.3 and result.val["loss"] == 0.8
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen[1][name])
    assert [r["lr"] for r in records] == [0.01] * 4  # the loss improved every epoch: no plateau decay
    # equal on the task's metric: train.monitor breaks the tie (the later epoch's lower loss)
    task = toy_task(metric_script=[0.5, 0.3, 0.3, 0.4], loss_script=losses)
    torch.manual_seed(0)
    assert fit(task.build_model(), task, cfg, seed=0).kept_epoch == 3
    # without restore_best the stage keeps its last epoch
    task = toy_task(metric_script=errors, loss_script=losses)
    torch.manual_seed(0)
    last = fit(task.build_model(), task, cfg.replace(restore_best=False), seed=0)
    assert last.kept_epoch == 4 and last.val["error"] == 0.45


def test_a_kept_average_of_epochs_is_no_single_epoch():
    cfg = TrainConfig(epochs=4, lr=0.01, average_best=2)
    _, result, _ = _fit_recording_weights(cfg, [0.5, 0.4, 0.45, 0.3, 0.3])  # the average ties: kept
    assert result.kept_epoch is None
    _, result, _ = _fit_recording_weights(cfg, [0.5, 0.4, 0.45, 0.3, 0.35])  # the average is worse
    assert result.kept_epoch == 4


def test_the_stage_record_carries_the_kept_epoch_and_the_curves_mark_it(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from topdown.config import RunConfig
    from topdown.procedures import run_procedure
    from topdown.report import plot_curves
    from topdown.runs import RunDir

    task = toy_task(metric_script=[0.5, 0.3, 0.4, 0.45, 0.3], loss_script=[0.9, 0.8, 0.7, 0.6, 0.8])
    config = RunConfig.from_dict({"train": {"epochs": 4, "lr": 0.01, "monitor": "loss"}})
    summary = run_procedure("baseline", task, tmp_path / "run", config=config, seed=0)
    stage = summary["stages"][0]
    assert stage["kept_epoch"] == 2 and stage["val"]["error"] == 0.3
    stars, plot = [], Axes.plot
    monkeypatch.setattr(
        Axes, "plot", lambda ax, *a, **k: (k.get("marker") == "*" and stars.append(a), plot(ax, *a, **k))[1]
    )
    plot_curves(summary, RunDir(tmp_path / "run").read_metrics(), tmp_path / "curves.png")
    assert stars == [(2, 0.3)] and (tmp_path / "curves.png").stat().st_size > 0
