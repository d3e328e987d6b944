"""Reading an image-folder corpus for the ``image`` task (``--data-dir DIR``):
``DIR/{train,val,test}/<class>/*.png|jpg`` with Pillow, checked so that nothing in the folders is
silently ignored, as uint8 images and labels per split (val/ optional: without it a fixed share of
train/ is held out)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from topdown.errors import ConfigError, DataError
from topdown.task import data_location

if TYPE_CHECKING:
    from topdown.tasks.image import Data

SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_DIRS = ("train", "val", "test")  # the only directories an image-folder corpus may hold at its top
SYSTEM_DIRS = (
    "__MACOSX",
    "lost+found",
)  # left by unzipping on macOS, and by a file system's root: never a split
VAL_ALIASES = ("valid", "validation", "dev")  # other corpora's names for val/: told where the images go
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
WIDE_RANGE = (
    65535  # 16-bit grayscale (Pillow opens it as "I;16", older Pillows as "I"): the value that maps to 255
)
HOLDOUT_SEED = 12345  # the held-out validation images (no val/ directory): fixed whatever the run's seed


def _unreadable(path: Path, root: Path, e: Exception) -> DataError:
    return DataError(
        f"cannot read image {path.relative_to(root)}: "
        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
    )


def _to_8bit(im, path: Path, root: Path):
    """16-bit grayscale ("I;16...") as mode "L", scaled by 255 / 65535 and rounded: Pillow's own
    convert("L") clips every value above 255, which turns a 16-bit image white. 32-bit integer
    ("I") pixels within 0..255 are read as they are (as convert does); beyond that their range is
    unknown (16-bit data? 32-bit?), so they are refused rather than guessed at, as are float ("F") ones."""
    from PIL import Image

    where = f"image {path.relative_to(root)}"
    if im.mode == "F":
        raise DataError(
            f"{where}: mode F (32-bit float pixels) is not supported; save it as 8- or 16-bit grayscale"
        )
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im).astype(np.int64)
    if im.mode == "I":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(
                f"{where}: mode I (32-bit integer) pixels range {a.min()}..{a.max()}, whose full scale is "
                "unknown; save it as 8- or 16-bit grayscale"
            )
        return Image.fromarray(a.astype(np.uint8))
    return Image.fromarray(
        ((a * 255 + WIDE_RANGE // 2) // WIDE_RANGE).astype(np.uint8)
    )  # 2-D uint8: mode "L"


def _read(path: Path, root: Path, color: str, resize: int) -> np.ndarray:
    """One image as uint8 (H, W, C); ``color`` is "gray" or "rgb"."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = _to_8bit(im, path, root).convert("L" if color == "gray" else "RGB")
            if resize > 0 and im.size != (resize, resize):
                im = im.resize((resize, resize), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _unreadable(path, root, e) from None
    return a[:, :, None] if a.ndim == 2 else a


def _list_split(root: Path, split: str) -> dict[str, list[Path]]:
    """``root/split/<class>/*.png|jpg`` as {class: sorted image paths}; empty classes and splits
    are errors."""
    folder = root / split
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"the {split} split is empty: {folder} has no class directories")
    out = {}
    for c in classes:
        files = sorted(
            p
            for p in c.iterdir()
            if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"class directory {split}/{c.name} has no images ({', '.join(SUFFIXES)})")
        out[c.name] = files
    return out


def _color_of(files: list[Path], root: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    for path in files:
        try:
            with Image.open(path) as im:
                if im.mode not in GRAY_MODES:
                    return "rgb"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise _unreadable(path, root, e) from None
    return "gray"


def _check_layout(root: Path, data_cfg: Data) -> None:
    """Refuse what would be silently ignored: a directory beside train/, val/, test/ (a valid/
    would leave its images unused and hold out part of train/ instead), and the fraction
    options that these folders make meaningless."""
    unknown = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name not in SPLIT_DIRS
        and p.name not in SYSTEM_DIRS
    )
    if unknown:
        hint = "; validation images go in val/" if any(n.lower() in VAL_ALIASES for n in unknown) else ""
        raise DataError(
            f"{root}: unknown director{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(n + '/' for n in unknown)}"
            f" (expected only train/, test/ and an optional val/){hint}"
        )
    ignored = {"test_fraction": "test/ holds the test images (the fraction splits the bundled digits only)"}
    if (root / "val").is_dir():
        ignored["val_fraction"] = (
            "val/ holds the validation images (the fraction holds out part of train/ only without val/)"
        )
    for key, why in ignored.items():
        value, default = getattr(data_cfg, key), getattr(type(data_cfg)(), key)  # the section's own default
        if value != default:
            raise ConfigError(
                f"data.{key}={value} has no effect with --data-dir {root}: {why}; "
                f"leave it at its default {default}"
            )


def load_folders(
    data_cfg: Data, data_dir: str
) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Classes (train's class directories, sorted: label = index), uint8 (N, C, H, W) images and
    labels per split, and facts for ``task_info``. The training images are in a fixed shuffled
    order (so that a subset, a prefix, samples every class), the same whatever the seed."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError('reading image folders needs Pillow: pip install "topdown[image]"') from None
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: missing the {split}/ directory (expected {split}/<class>/*.png|jpg)")
    _check_layout(root, data_cfg)
    listed = {split: _list_split(root, split) for split in SPLIT_DIRS if (root / split).is_dir()}
    classes = sorted(listed["train"])
    if len(classes) < 2:  # one class trains to loss 0 and 0 % error: a "success" that means nothing
        raise DataError(
            f"{root / 'train'}: only one class directory ({classes[0]!r}); classification needs at least 2"
        )
    index = {c: i for i, c in enumerate(classes)}
    for split in ("val", "test"):
        if unknown := sorted(set(listed.get(split, {})) - set(index)):
            raise DataError(
                f"the {split} split has class {unknown[0]!r}, which is not in train (classes: "
                f"{', '.join(classes)})"
            )
    every = [p for split in listed.values() for files in split.values() for p in files]
    color = data_cfg.color if data_cfg.color != "auto" else _color_of(every, root)
    splits, first = {}, None
    for split, by_class in listed.items():
        images, labels = [], []
        for c, files in by_class.items():
            for path in files:
                a = _read(path, root, color, data_cfg.resize)
                if first is None:
                    first = (path, a.shape)
                elif a.shape != first[1]:
                    raise DataError(
                        f"images differ in size ({first[0].relative_to(root)} is "
                        f"{first[1][1]}x{first[1][0]}, "
                        f"{path.relative_to(root)} is {a.shape[1]}x{a.shape[0]}); set data.resize=N to "
                        "resize every image to NxN"
                    )
                images.append(a)
                labels.append(index[c])
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        splits[split] = (x, torch.tensor(labels, dtype=torch.int64))
    x, y = splits["train"]
    order = torch.from_numpy(np.random.default_rng(HOLDOUT_SEED).permutation(len(y)))
    x, y = x[order], y[order]
    source = "val/"
    if "val" not in splits:
        n_val = int(len(y) * data_cfg.val_fraction)
        if n_val == 0 or n_val == len(y):
            raise DataError(
                f"the val split is empty: no val/ directory, and data.val_fraction {data_cfg.val_fraction} "
                f"of {len(y)} training images holds out none"
            )
        splits["val"], source = (x[:n_val], y[:n_val]), f"a fixed {data_cfg.val_fraction:g} of train/"
        x, y = x[n_val:], y[n_val:]
    splits["train"] = (x, y)
    return (
        classes,
        splits,
        {"data": "image folders", **data_location(data_dir), "val_from": source, "color": color},
    )
