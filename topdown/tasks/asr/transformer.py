"""``asr-transformer``: character CTC ASR on AN4 with a Transformer encoder (the paper's
Switchboard self-attention model, at CPU scale).

Blocks, input to output: ``frontend`` (two stride-2 3x3 convolutions that subsample time
by 4, a linear projection to the model width, sinusoidal positions), ``layer1`` ..
``layerN`` (one pre-LayerNorm self-attention encoder layer each: multi-head attention and
a feed-forward network, each in a residual branch with dropout; with ``model.conv_kernel`` > 0
one Conformer layer each instead) and ``output`` (the final
LayerNorm and the linear CTC layer over blank and the characters).

The recipe: Adam with a linear learning-rate warm-up (``train.warmup_steps``, restarted in
every stage since each stage builds a fresh optimizer), then the loop's plateau decay (the
``bench`` preset: a one-cycle schedule instead, whose first 30 % rise is its warm-up);
dropout in attention, residual and feed-forward branches; SpecAugment-style masking of the
training features (``data.spec_augment``). No label smoothing: it is not standard for CTC.
"""

from __future__ import annotations

import math
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
    d_model: int = option(144, ge=1)
    heads: int = option(4, ge=1)
    ff: int = option(576, ge=1)
    layers: int = option(4, ge=1)
    channels: int = option(64, ge=1)  # convolution maps of the front end
    dropout: float = option(0.1, ge=0, lt=1)
    # > 0: Conformer layers (Gulati et al., 2020) with a depthwise convolution of this width (odd)
    # instead of Transformer layers; 0 = Transformer layers
    conv_kernel: int = option(0, ge=0)

    def check_relations(self) -> None:
        if self.d_model % self.heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be a multiple of model.heads ({self.heads})"
            )
        if self.conv_kernel and self.conv_kernel % 2 == 0:
            raise ConfigError(
                f"model.conv_kernel must be odd (a centred convolution), got {self.conv_kernel}"
            )


SECTIONS = common.sections(Model)
DEFAULTS: dict[str, Any] = {
    # AN4: 13 cepstra + deltas + delta-deltas at 100 frames/s; the convolutional front end
    # does the subsampling (to 25 frames/s), so no frame stacking.
    "data": {
        "stack": 1,
        "batch_size": 8,
        "spec_augment": {"freq_masks": 2, "freq_width": 5, "time_masks": 2, "time_width": 20},
    },
    # As for asr-rnn: CTC emits only blanks for a while, so the schedule watches the
    # validation CTC loss. Warm-up over ~1.4 epochs (106 batches of 8 per epoch on AN4).
    "train": {
        "epochs": 40,
        "lr": 0.002,
        "lr_patience": 2,
        "early_stop": 5,
        "monitor": "loss",
        "min_lr": 1e-5,
        "warmup_steps": 150,
        "min_epoch_steps": 100,
    },  # as asr-rnn: a small corpus is passed over more than once per epoch
}
# The default preset with --data-dir (a corpus of the user's own; the CLI says it uses it):
# demo is sized for the bundled AN4 demonstration; bench is the strongest recipe chosen on validation.
OWN_CORPUS_PRESET = "bench"
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "data": {"limit": 48, "spec_augment": {"freq_masks": 0, "time_masks": 0}},
        "model": {"d_model": 32, "heads": 2, "ff": 64, "layers": 2, "channels": 8},
        "train": {"epochs": 2, "warmup_steps": 2, "min_epoch_steps": 0},
        "decode": {"beam": 0},
    },
    # demo: baseline and two cascade stages (classifier = output; = layer3, layer4, output).
    "demo": {"train": {"epochs": 12}, "cascade": {"splits": [5, 3]}},
    # bench: chosen on validation (bench/RESULTS.md): Conformer layers (depthwise kernel 15),
    # per-speaker CMVN, and asr-rnn's kind of schedule: one-cycle lr over 40 epochs, the epoch with the
    # best validation WER kept (no early stopping); cascade stages of 15 epochs, splits 5, 3, 1.
    # Baseline, 2 seeds: 12.2 / 13.1 % test WER greedy (the Transformer layers: 65-70 %).
    "bench": {
        "data": {"cmvn": "speaker"},
        "model": {"conv_kernel": 15},
        "train": {"epochs": 40, "schedule": "onecycle", "monitor": "wer", "early_stop": 0},
        "cascade": {"splits": [5, 3, 1], "epochs": 15},
    },
    # For a GPU and the real Switchboard corpus (300 h, Kaldi data directories of 80-dim
    # fbank, `--data-dir`); not run here. The paper's abstract gives no sizes: these are
    # ASSUMED, the common ESPnet-style Switchboard Transformer encoder (12 layers, width
    # 256, 4 heads, feed-forward 2048, conv2d subsampling by 4, 25k warm-up steps), with a
    # CTC output instead of an attention decoder. See docs/asr.md.
    "paper": {
        "data": {
            "deltas": False,
            "batch_size": 32,
            "val_speakers": 10,
            "spec_augment": {"freq_masks": 2, "freq_width": 30, "time_masks": 2, "time_width": 40},
        },
        "model": {"d_model": 256, "heads": 4, "ff": 2048, "layers": 12, "channels": 256, "dropout": 0.1},
        "train": {
            "min_epoch_steps": 0,
            "epochs": 100,
            "lr": 0.001,
            "early_stop": 5,
            "lr_patience": 2,
            "clip": 5.0,
            "amp": "bf16",
            "warmup_steps": 25000,
        },
        "decode": {"beam": 16},
    },
}


def out_length(n: int | torch.Tensor) -> Any:
    """Frames after the front end's two unpadded stride-2 3x3 convolutions."""
    first = (n - 1) // 2
    return (first - 1) // 2


def positions(length: int, width: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal position encodings (length, width) (Vaswani et al., 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width)
    )
    pe = torch.zeros(length, width, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return pe


class ConvSubsampling(nn.Module):
    """(B, T, D) features -> (B, T', d_model), T' = out_length(T): two 3x3 stride-2 conv + ReLU."""

    def __init__(self, inputs: int, d_model: int, channels: int, dropout: float):
        super().__init__()
        freq = out_length(inputs)
        if freq < 1:
            raise ValueError(f"the convolutional front end needs at least 7 feature dimensions, got {inputs}")
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU()
        )
        self.proj = nn.Linear(channels * freq, d_model)
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = self.proj(x.transpose(1, 2).reshape(b, t, c * f))
        x = x * self.scale + positions(t, x.shape[2], x.device).to(x.dtype)
        return self.dropout(x), out_length(lengths).clamp(min=1)


def self_attention(
    norm: nn.LayerNorm, attn: nn.MultiheadAttention, x: torch.Tensor, padding: torch.Tensor
) -> torch.Tensor:
    """The pre-LN self-attention branch of both layer kinds, MHA(LN(x)) with padding frames
    masked as keys. A function, not a module, so that both layers keep their parameter names."""
    h = norm(x)
    return attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]


class EncoderLayer(nn.Module):
    """Pre-LayerNorm Transformer encoder layer: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self_attention(self.attn_norm, self.attn, x, padding))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class ConvolutionModule(nn.Module):
    """The Conformer's convolution module: LN, pointwise conv + GLU, depthwise conv over time,
    LN (the paper's BatchNorm would average over padding frames), SiLU, pointwise conv, dropout.
    Padding frames are zeroed before the depthwise convolution, so they never leak into speech."""

    def __init__(self, d_model: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.depthwise_norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = nn.functional.glu(self.pointwise_in(self.norm(x)), dim=-1).masked_fill(padding[..., None], 0.0)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise_out(nn.functional.silu(self.depthwise_norm(h))))


class ConformerLayer(nn.Module):
    """Conformer layer: x + FFN/2, x + MHA(LN(x)), x + Conv(x), x + FFN/2, then LN
    (the macaron feed-forward pair uses SiLU, as the paper)."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float, kernel: int):
        super().__init__()

        def feed_forward() -> nn.Sequential:
            return nn.Sequential(
                nn.LayerNorm(d_model),
                nn.Linear(d_model, ff),
                nn.SiLU(),
                nn.Dropout(dropout),
                nn.Linear(ff, d_model),
                nn.Dropout(dropout),
            )

        self.ff_in, self.ff_out = feed_forward(), feed_forward()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.conv = ConvolutionModule(d_model, kernel, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff_in(x)
        x = x + self.dropout(self_attention(self.attn_norm, self.attn, x, padding))
        x = x + self.conv(x, padding)
        return self.norm(x + 0.5 * self.ff_out(x))


class TransformerCTC(nn.Module):
    def __init__(
        self,
        inputs: int,
        d_model: int,
        heads: int,
        ff: int,
        layers: int,
        channels: int,
        dropout: float,
        vocab: int = len(AN4_VOCAB),
        conv_kernel: int = 0,
    ):
        super().__init__()
        self.frontend = ConvSubsampling(inputs, d_model, channels, dropout)
        self.encoder = nn.ModuleList(
            ConformerLayer(d_model, heads, ff, dropout, conv_kernel)
            if conv_kernel
            else EncoderLayer(d_model, heads, ff, dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, vocab)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, out_lengths = self.frontend(feats, lengths)
        padding = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lengths.to(x.device)[:, None]
        for layer in self.encoder:
            x = layer(x, padding)
        return self.output(self.norm(x)), out_lengths


def block_names(model_cfg: Model) -> list[tuple[str, list[str]]]:
    return (
        [("frontend", ["frontend"])]
        + [(f"layer{i + 1}", [f"encoder.{i}"]) for i in range(model_cfg.layers)]
        + [("output", ["norm", "output"])]
    )


def build_model(cfg: TaskSections, inputs: int | None = None, vocab: int = len(AN4_VOCAB)) -> nn.Module:
    """The model for ``cfg``; ``inputs``/``vocab`` default to the bundled AN4's (13 cepstra, 28 symbols)."""
    m = cfg.model
    return TransformerCTC(
        inputs or feature_dim(cfg.data),
        m.d_model,
        m.heads,
        m.ff,
        m.layers,
        m.channels,
        m.dropout,
        vocab,
        m.conv_kernel,
    )


def make(cfg: TaskSections, data_dir: str | None = None) -> Task:
    return common.make_task("asr-transformer", cfg, data_dir, build_model, block_names, out_length)
