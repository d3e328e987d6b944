"""The training loop's schedule: warm-up per step, plateau decay and early stopping per epoch."""

import pytest
import torch

import topdown.loop as loop
from topdown import ConfigError, TrainConfig
from topdown.loop import fit

from conftest import toy_task


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
    assert per_epoch == pytest.approx([0.01, 0.01, 0.005, 0.0025])  # decays after each epoch without improvement
    task = toy_task(metric_script=script)
    torch.manual_seed(0)
    result = fit(task.build_model(), task, cfg, seed=0)
    assert result.epochs == 4 and result.val["error"] == 0.5  # stopped 3 epochs after the best; best restored


def test_bf16_autocast_trains(monkeypatch):
    """train.amp=bf16 runs the training forward under autocast (here on CPU; on CUDA the same)."""
    task = toy_task()
    dtypes = []
    loss = task.loss
    task.loss = lambda model, batch: (dtypes.append(model.out(torch.zeros(1, 16)).dtype), loss(model, batch))[1]
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
    with pytest.raises(ConfigError, match="not a validation metric"):
        fit(task.build_model(), task, TrainConfig(epochs=1, monitor="bleu"), seed=0)


def test_onecycle_and_cosine_are_pure_functions_of_the_step(monkeypatch):
    """train.schedule=onecycle/cosine: the lr of every step follows scheduled_lr over the stage's
    planned steps (epochs x batches), and validation plateaus do not decay it."""
    script = [0.5, 0.6, 0.6, 0.6]  # plateaus that would halve a plateau schedule's lr
    for schedule in ("onecycle", "cosine"):
        cfg = TrainConfig(epochs=4, lr=0.01, schedule=schedule, warmup_steps=2 if schedule == "cosine" else 0)
        lrs = recorded_lrs(monkeypatch, cfg, toy_task(metric_script=script))
        assert lrs == pytest.approx([loop.scheduled_lr(cfg, 0.01, s, 16) for s in range(16)])  # 4 batches x 4 epochs
        assert max(lrs) == pytest.approx(0.01, rel=0.05) and lrs[-1] < 0.01 * 0.05
    onecycle = TrainConfig(lr=0.01, schedule="onecycle")
    assert loop.scheduled_lr(onecycle, 0.01, 0, 100) == pytest.approx(0.01 / 25)
    assert loop.scheduled_lr(onecycle, 0.01, 30, 100) == pytest.approx(0.01)
    assert loop.scheduled_lr(onecycle, 0.01, 99, 100) == pytest.approx(0.01 / 25 / 1e4)
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
    torch.manual_seed(0)
    resumed = task.build_model()
    fit(resumed, task, cfg, seed=0, resume_path=tmp_path / "r3.safetensors")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
