"""``asr-rnn``: character CTC ASR on AN4 with a BLSTM encoder (the paper's WSJ BLSTM, at CPU scale).

Blocks, input to output: ``lstm1`` .. ``lstmN`` (one bidirectional LSTM layer each) and
``output`` (the linear CTC layer over blank and the characters: space and A-Z on AN4).
With ``model.subsample`` the encoder is pyramidal (Listen, Attend and Spell's pBLSTM): after a
layer, each run of n adjacent output frames is concatenated into one, so the layers above run at a
lower frame rate (cheaper, and a longer context per frame).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from topdown.errors import ConfigError
from topdown.sections import Section, TaskSections, option
from topdown.task import Task
from topdown.tasks.asr import common
from topdown.tasks.asr.data import AN4_VOCAB, feature_dim


@dataclass(frozen=True)
class Model(Section):
    SECTION: ClassVar[str] = "model"
    hidden: int = option(128, ge=1)  # cells per direction
    layers: int = option(3, ge=1)
    dropout: float = option(0.1, ge=0, lt=1)
    # time reduction after each layer, bottom first: [2] halves the frame rate above lstm1,
    # [1, 2] above lstm2; the empty list keeps every layer at the input's frame rate
    subsample: list[int] = option(default_factory=list, ge=1)

    def check_relations(self) -> None:
        if len(self.subsample) > self.layers:
            raise ConfigError(f"model.subsample has {len(self.subsample)} factors for {self.layers} layers")


SECTIONS = common.sections(Model)
DEFAULTS: dict[str, Any] = {
    # CTC spends its first epochs emitting only blanks (WER stuck at 100 %), so the lr
    # schedule and early stopping watch the validation CTC loss, which moves from the start;
    # the stage keeps the epoch with the lowest validation WER (which decides acceptance).
    # An epoch is at least 100 optimizer steps (AN4 has 106 batches of 8), so that a corpus of a
    # few dozen utterances is trained as long as AN4 rather than stopped in CTC's blank phase.
    "train": {
        "epochs": 8,
        "lr": 0.002,
        "lr_patience": 1,
        "early_stop": 3,
        "monitor": "loss",
        "min_epoch_steps": 100,
    },
}
# The default preset with --data-dir (a corpus of the user's own; the CLI says it uses it):
# measured on a 20-speaker corpus: bench 20.1 % test WER, demo 60.3 % (bench/RESULTS.md).
OWN_CORPUS_PRESET = "bench"
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "data": {"limit": 48},
        "model": {"hidden": 16, "layers": 2},
        "train": {"epochs": 2, "min_epoch_steps": 0},
        "decode": {"beam": 0},
    },
    "demo": {},
    # Chosen on validation (bench/RESULTS.md): per-speaker CMVN, SpecAugment for cepstra, dropout
    # 0.3, 256 cells, 3 stacked frames, and a one-cycle schedule over a fixed 80 epochs (no early
    # stopping; the best epoch on validation WER is kept, CTC's all-blank first epochs cannot be it).
    # 80 epochs, not 40 (the recipe until 2026-12-01): lower validation WER on both seeds tried
    # (bench/RESULTS.md).
    # An epoch is at least 25 steps (AN4: 53 batches of 16), so a small corpus gets the 2,000 steps
    # that the 40-epoch recipe's 50-step epochs gave it (measured there: 20.1 % test WER).
    "bench": {
        "data": {
            "cmvn": "speaker",
            "batch_size": 16,
            "stack": 3,
            "spec_augment": {"freq_masks": 2, "freq_width": 4, "time_masks": 2, "time_width": 5},
        },
        "model": {"hidden": 256, "dropout": 0.3},
        "train": {
            "epochs": 80,
            "lr": 0.003,
            "schedule": "onecycle",
            "monitor": "wer",
            "early_stop": 0,
            "min_epoch_steps": 25,
        },
    },
    # For a GPU and the real WSJ corpus (si284 / dev93 / eval92 as Kaldi data directories of
    # 80-dim fbank, `--data-dir`); not run here. The paper's abstract gives no sizes: these are
    # an ASSUMED, typical WSJ character-CTC BLSTM (4 layers x 320 cells per direction, as in
    # common WSJ CTC recipes), not the paper's numbers. See docs/asr.md.
    "paper": {
        "data": {
            "deltas": False,
            "stack": 3,
            "batch_size": 32,
            "val_speakers": 10,
            "spec_augment": {"freq_masks": 2, "freq_width": 27, "time_masks": 2, "time_width": 40},
        },
        "model": {"hidden": 320, "layers": 4, "dropout": 0.3},
        "train": {
            "min_epoch_steps": 0,
            "epochs": 30,
            "lr": 0.001,
            "early_stop": 4,
            "min_lr": 1e-5,
            "amp": "bf16",
        },
        "decode": {"beam": 16},
    },
}


def reduced(frames, factor: int):
    """Frames (an int or a tensor of lengths) after folding runs of ``factor``; a partial last run counts."""
    return (frames + factor - 1) // factor


class BLSTMLayer(nn.Module):
    """One bidirectional LSTM layer over padded sequences, followed by dropout and, with
    ``subsample`` > 1, the concatenation of that many adjacent output frames.

    Each direction runs on padded input instead of a packed sequence: on a CPU a packed sequence
    takes PyTorch's step-by-step kernel, with which a ``bench`` training step took about twice as
    long as with the fused (oneDNN) kernel that padded input gets (bench/blstm_speed.py). The
    forward direction reads each sequence as it is (its padding comes after its frames, so cannot
    reach them); the backward direction reads each sequence reversed within its own length, and its
    outputs are mirrored back. That is the packed layer's function exactly, with its parameters and
    their names."""

    def __init__(self, inputs: int, hidden: int, dropout: float, subsample: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.subsample = subsample

    def _direction(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        """One direction's outputs (batch, time, hidden) for padded ``x``, from zero state."""
        weights = [
            getattr(self.lstm, f"{name}_l0{suffix}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]
        zeros = x.new_zeros(1, x.shape[0], self.lstm.hidden_size)
        out, _, _ = torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)
        return out

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(x.shape[1], device=x.device)
        ends = lengths.to(x.device)[:, None]
        valid = steps < ends
        # frame t of a sequence of length n is frame n-1-t of its reversal; padding frames stay put
        mirror = torch.where(valid, ends - 1 - steps, steps)[:, :, None]
        # cuDNN cannot backpropagate through an RNN in eval mode, which is what a frozen
        # layer above a trained one needs; its native kernel can.
        with torch.backends.cudnn.flags(enabled=self.training or not torch.is_grad_enabled()):
            forward = self._direction(x, "")
            backward = self._direction(x.gather(1, mirror.expand_as(x)), "_reverse")
        backward = backward.gather(1, mirror.expand_as(backward))
        out = torch.cat([forward, backward], dim=2) * valid[:, :, None]
        out = self.dropout(out)
        n = self.subsample
        if n == 1:
            return out, lengths
        # zero-pad the time axis to a multiple of n (padding frames are zero already), then
        # fold each run of n frames into the feature axis; a partial last run keeps its zeros
        batch, time, width = out.shape
        out = nn.functional.pad(out, (0, 0, 0, -time % n)).reshape(batch, reduced(time, n), n * width)
        return out, reduced(lengths, n)


class BLSTMCTC(nn.Module):
    def __init__(
        self,
        inputs: int,
        hidden: int,
        layers: int,
        dropout: float,
        vocab: int = len(AN4_VOCAB),
        subsample: list[int] | None = None,
    ):
        super().__init__()
        factors = list(subsample or []) + [1] * (layers - len(subsample or []))
        sizes = [inputs] + [2 * hidden * n for n in factors]
        self.encoder = nn.ModuleList(BLSTMLayer(a, hidden, dropout, n) for a, n in zip(sizes, factors))
        self.output = nn.Linear(sizes[-1], vocab)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = feats
        for layer in self.encoder:
            x, lengths = layer(x, lengths)
        return self.output(x), lengths


def block_names(model_cfg: Model) -> list[tuple[str, list[str]]]:
    return [(f"lstm{i + 1}", [f"encoder.{i}"]) for i in range(model_cfg.layers)] + [("output", ["output"])]


def build_model(cfg: TaskSections, inputs: int | None = None, vocab: int = len(AN4_VOCAB)) -> nn.Module:
    """The model for ``cfg``; ``inputs``/``vocab`` default to the bundled AN4's (13 cepstra, 28 symbols)."""
    m = cfg.model
    return BLSTMCTC(
        inputs or feature_dim(cfg.data),
        m.hidden,
        m.layers,
        m.dropout,
        vocab,
        m.subsample,
    )


def make(cfg: TaskSections, data_dir: str | None = None) -> Task:
    def out_length(frames: int) -> int:
        return functools.reduce(reduced, cfg.model.subsample, frames)

    return common.make_task("asr-rnn", cfg, data_dir, build_model, block_names, out_length)
