"""``image``: image classification with a small residual CNN (the paper's later revision), digits
or image folders.

Blocks, input to output: ``stem`` (3x3 convolution, BatchNorm, ReLU), ``stage1`` ..
``stageN`` (``model.depth`` residual basic blocks each; every stage after the first halves
the resolution and doubles the width, ``model.width`` channels in the first), ``head`` (global average
pooling, BatchNorm, dropout, linear). Every block holds BatchNorm, so the frozen-BatchNorm
invariants are exercised by a convolutional model. Default data: the bundled 8x8 digits
(the digits task's fixed split); ``--data-dir DIR`` reads ``DIR/{train,val,test}/<class>/*.png|jpg``
with Pillow (``topdown.tasks.image_folders``). The ``paper`` preset is ResNet-18 for 32x32 RGB
(CIFAR-scale) data, for a GPU. See docs/image.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from topdown.sections import Section, TaskSections, option
from topdown.task import Task, cross_entropy_loss, index_batches
from topdown.tasks import digits
from topdown.tasks.image_folders import load_folders
from topdown.tasks.regime import classification_set


@dataclass(frozen=True)
class Data(digits.Data):
    """The digits task's data options (its held-out fractions: for digits, and for image folders
    without val/ the share of train held out; test_fraction is digits only, and other values are
    refused with image folders), and these. ``augment`` (true here) switches the random crop and
    flip off whatever their options say."""

    AUGMENTS: ClassVar[bool] = True
    augment: bool = True
    eval_batch_size: int = option(1000, ge=1)
    crop_padding: int = option(1, ge=0)  # random crop after zero padding by this many pixels; 0 = no crop
    flip: bool = False  # random horizontal flip (off for digits: a mirrored digit is another symbol)
    resize: int = option(0, ge=0)  # > 0: resize every image to resize x resize; 0: images must share one size
    color: str = option("auto", choices=("auto", "gray", "rgb"))  # auto: gray if every image is, else RGB


@dataclass(frozen=True)
class Model(Section):
    SECTION: ClassVar[str] = "model"
    width: int = option(16, ge=1)  # channels of the stem and the first stage; each later stage doubles them
    stages: int = option(
        3, ge=1
    )  # residual stages (each a block); every stage after the first halves the resolution
    depth: int = option(1, ge=1)  # basic blocks per stage
    dropout: float = option(0.0, ge=0, lt=1)  # in the head, before the linear layer


SECTIONS = {"data": Data, "model": Model}
DEFAULTS: dict[str, Any] = {
    # SGD with momentum, weight decay; the lr decays on validation-loss plateaus and early
    # stopping ends each stage at a low lr (chosen on digits validation, see docs/image.md).
    # The stage keeps the epoch with the lowest validation error (the task's metric, which
    # decides acceptance); 359 digits move the error in steps of 0.28 points, so it ties
    # often, and the loss (train.monitor) breaks the ties.
    "train": {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "clip": 0.0,
        "epochs": 40,
        "lr_decay": 0.3,
        "lr_patience": 3,
        "early_stop": 8,
        "monitor": "loss",
    },
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": {"width": 4, "stages": 2}, "train": {"epochs": 2}},
    "demo": {},
    "bench": {"model": {"width": 32}, "train": {"epochs": 60, "early_stop": 10}},
    # ResNet-18 for CIFAR-scale 32x32 RGB data (He et al.'s basic blocks, 3x3 stem without max
    # pooling): for a GPU and --data-dir; not run here
    "paper": {
        "data": {"batch_size": 128, "crop_padding": 4, "flip": True},
        "model": {"width": 64, "stages": 4, "depth": 2},
        "train": {
            "lr": 0.1,
            "epochs": 200,
            "lr_decay": 0.2,
            "lr_patience": 10,
            "early_stop": 25,
            "amp": "bf16",
        },
    },
}


class BasicBlock(nn.Module):
    """He et al.'s basic block: two 3x3 convolutions with BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, classes: int, channels: list[int], depth: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU()
        )
        stages, c_in = [], channels[0]
        for i, c in enumerate(channels):
            stages.append(
                nn.Sequential(
                    *(
                        BasicBlock(c_in if j == 0 else c, c, 2 if i > 0 and j == 0 else 1)
                        for j in range(depth)
                    )
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.BatchNorm1d(c_in),
            nn.Dropout(dropout),
            nn.Linear(c_in, classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def block_names(model_cfg: Model) -> list[tuple[str, list[str]]]:
    stages = [(f"stage{i + 1}", [f"stages.{i}"]) for i in range(model_cfg.stages)]
    return [("stem", ["stem"]), *stages, ("head", ["head"])]


def build_model(cfg: TaskSections, in_channels: int = 1, classes: int = 10) -> ResNet:
    """Without data (``topdown list``): the digits' shape, one channel and ten classes."""
    m = cfg.model
    return ResNet(in_channels, classes, [m.width * 2**i for i in range(m.stages)], m.depth, m.dropout)


def load_digits(
    data_cfg: Data,
) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """The digits task's fixed split, as (N, 1, 8, 8) images in [0, 1]."""
    splits = {k: (x.reshape(-1, 1, 8, 8), y) for k, (x, y) in digits.load_splits(data_cfg).items()}
    return (
        [str(i) for i in range(10)],
        splits,
        {
            "data": "digits (bundled, the digits task's fixed split)",
            "val_from": "digits split",
            "color": "gray",
        },
    )


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, C, H, W) shifted by a random crop of its zero-padded copy."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    crops = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(
        0, 3, 1, 2
    )  # (B, H, W, C) -> (B, C, H, W)
    # copied into a plain (NCHW) tensor: with one channel the permuted view already counts as
    # contiguous, but its strides are channels-last, and torch's CPU convolution backward then
    # corrupts memory for some widths (torch 2.13, 4 channels: "corrupted double-linked list")
    return torch.empty(crops.shape, dtype=crops.dtype).copy_(crops)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def make(cfg: TaskSections, data_dir: str | None = None) -> Task:
    d = cfg.data
    classes, splits, facts = load_digits(d) if data_dir is None else load_folders(d, data_dir)
    channels, height, width = splits["train"][0].shape[1:]
    pixels = to_float(splits["train"][0])
    mean, std = (
        pixels.mean(dim=(0, 2, 3)),
        pixels.std(dim=(0, 2, 3)).clamp_min(1e-3),
    )  # per channel, of all training images (so evaluation inputs do not depend on data.fraction)
    x_train, y_train, regime = classification_set(*splits["train"], len(classes), d)
    splits["train"] = (x_train, y_train)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (to_float(x) - mean[:, None, None]) / std[:, None, None]

    def train_batches(generator: torch.Generator, subset: float):
        for idx in index_batches(len(y_train), subset, d.batch_size, generator):
            x = to_float(x_train[idx])
            if d.augment and d.crop_padding > 0:
                x = random_crop(x, d.crop_padding, generator)  # pads with black (the digits' background)
            if d.augment and d.flip:
                x = random_flip(x, generator)
            yield normalise(x), y_train[idx]

    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        x, y = splits[split]
        device = next(model.parameters()).device
        errors, total = 0, 0.0
        for i in range(0, len(y), d.eval_batch_size):
            logits = model(normalise(x[i : i + d.eval_batch_size]).to(device)).float().cpu()
            target = y[i : i + d.eval_batch_size]
            errors += int((logits.argmax(1) != target).sum())
            total += F.cross_entropy(logits, target, reduction="sum").item()
        return {"error": errors / len(y), "loss": total / len(y)}

    info = {
        **facts,
        "classes": classes,
        "image_size": [int(height), int(width)],
        "channels": int(channels),
        "mean": [
            float(v) for v in mean
        ],  # per channel, of the training images in [0, 1]: the input normalisation
        "std": [float(v) for v in std],
        "images": {split: len(y) for split, (_, y) in splits.items()},
        **({"regime": regime} if regime else {}),
    }
    return Task(
        name="image",
        build_model=lambda: build_model(cfg, int(channels), len(classes)),
        blocks=block_names(cfg.model),
        train_batches=train_batches,
        loss=cross_entropy_loss,
        evaluate=evaluate,
        metric="error",
        lower_is_better=True,
        info=info,
    )
