"""image: the residual CNN and its blocks, image folders and their errors, augmentation, a tiny cascade."""

import shutil

import pytest
import torch
from conftest import cli
from PIL import Image
from safetensors.torch import load_file
from test_cli import assert_one_line_error

from topdown.blocks import Blocks
from topdown.errors import ConfigError, DataError
from topdown.procedures import run_procedure
from topdown.tasks import image, image_folders, resolve_config


def tiny_cfg(overrides=None):
    return resolve_config("image", "tiny", overrides or {})


def write_images(root, layout, size=(8, 8), mode="L"):
    """``layout``: {split: {class: number of images}}; image i of class c has pixel value 20 * c_index + i."""
    for split, classes in layout.items():
        for ci, (c, n) in enumerate(sorted(classes.items())):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                value = 20 * ci + i
                Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(
                    folder / f"{i}.png"
                )
    return root


LAYOUT = {"train": {"cat": 6, "dog": 6, "owl": 4}, "test": {"cat": 2, "dog": 2}}


# -- the model --------------------------------------------------------------------------------


def test_blocks_partition_the_model_and_every_block_has_batchnorm():
    cfg = tiny_cfg().task
    model = image.build_model(cfg)
    spec = image.block_names(cfg.model)
    assert [name for name, _ in spec] == ["stem", "stage1", "stage2", "head"]
    blocks = Blocks(model, spec)
    assert len(blocks) == 4
    for _, modules in spec:
        assert any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for m in model.get_submodule(modules[0]).modules()
        )
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_paper_preset_is_resnet18_sized():
    cfg = resolve_config("image", "paper", {}).task
    assert (cfg.model.width, cfg.model.stages, cfg.model.depth) == (64, 4, 2)
    model = image.build_model(cfg, in_channels=3, classes=10)
    assert [s[0].conv1.out_channels for s in model.stages] == [64, 128, 256, 512]
    n = sum(p.numel() for p in model.parameters())
    assert 11_100_000 < n < 11_250_000  # CIFAR ResNet-18: 11.17 M, plus the head's BatchNorm
    assert [b for b, _ in image.block_names(cfg.model)] == [
        "stem",
        "stage1",
        "stage2",
        "stage3",
        "stage4",
        "head",
    ]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# -- augmentation -----------------------------------------------------------------------------


def test_augmentation_is_a_function_of_the_generator_and_keeps_shapes():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    a = image.random_crop(x, 1, torch.Generator().manual_seed(3))
    b = image.random_crop(x, 1, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    for i in range(2):  # every crop is a shifted window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        assert any(
            torch.equal(a[i], padded[:, dy : dy + 4, dx : dx + 4]) for dy in range(3) for dx in range(3)
        )
    f = image.random_flip(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1)) for i in range(2))
    # and they do augment: over a few seeds some crop is shifted, some image is flipped and some is
    # not, and the result depends on the seed
    crops = [image.random_crop(x, 1, torch.Generator().manual_seed(s)) for s in range(8)]
    flips = [image.random_flip(x, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(c.shape == x.shape for c in crops) and any(
        not torch.equal(c[i], x[i]) for c in crops for i in range(2)
    )
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1)) for f in flips for i in range(2))
    assert any(torch.equal(f[i], x[i].flip(-1)) for f in flips for i in range(2)) and not torch.equal(
        x, x.flip(-1)
    )
    assert any(torch.equal(f[i], x[i]) for f in flips for i in range(2))
    assert any(not torch.equal(c, crops[0]) for c in crops[1:]) and any(
        not torch.equal(f, flips[0]) for f in flips[1:]
    )

    task = image.make(tiny_cfg().task)
    one = [b[0] for b in task.train_batches(torch.Generator().manual_seed(7), 1.0)]
    two = [b[0] for b in task.train_batches(torch.Generator().manual_seed(7), 1.0)]
    assert all(torch.equal(p, q) for p, q in zip(one, two))
    sub = [b[1] for b in task.train_batches(torch.Generator().manual_seed(7), 0.25)]
    assert sum(len(y) for y in sub) <= round(0.25 * task.info["images"]["train"])


# -- image folders ----------------------------------------------------------------------------


def test_image_folders_load_with_a_fixed_held_out_validation_set(tmp_path):
    root = write_images(tmp_path / "d", LAYOUT)
    cfg = tiny_cfg({"data": {"val_fraction": 0.25}}).task
    classes, splits, facts = image_folders.load_folders(cfg.data, str(root))
    assert classes == ["cat", "dog", "owl"]
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 12, "val": 4, "test": 4}
    assert splits["train"][0].shape == (12, 1, 8, 8) and splits["train"][0].dtype == torch.uint8
    assert sorted(splits["test"][1].tolist()) == [0, 0, 1, 1]
    again = image_folders.load_folders(cfg.data, str(root))[1]
    assert torch.equal(again["val"][0], splits["val"][0])  # the held-out images never depend on the run
    task = image.make(cfg, str(root))
    assert (
        task.info["classes"] == ["cat", "dog", "owl"]
        and task.info["channels"] == 1
        and task.info["image_size"] == [8, 8]
    )
    assert "fixed 0.25 of train" in task.info["val_from"]

    write_images(
        root, {"val": {"dog": 3}}, mode="RGB"
    )  # a val/ directory is used as given; one RGB image makes all RGB
    classes, splits, facts = image_folders.load_folders(tiny_cfg().task.data, str(root))
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 16, "val": 3, "test": 4}
    assert (
        facts["color"] == "rgb" and splits["test"][0].shape[1] == 3 and splits["val"][1].tolist() == [1, 1, 1]
    )


def test_a_tiny_baseline_on_image_folders_records_the_classes(tmp_path):
    root = write_images(tmp_path / "d", {"train": {"a": 8, "b": 8}, "test": {"a": 2, "b": 2}}, size=(6, 6))
    cfg = tiny_cfg({"train": {"epochs": 1}})
    summary = run_procedure(
        "baseline", image.make(cfg.task, str(root)), tmp_path / "run", config=cfg, seed=0, preset="tiny"
    )
    assert summary["status"] == "complete" and summary["task_info"]["classes"] == ["a", "b"]


def bad(tmp_path, kind):
    root = write_images(tmp_path / "d", LAYOUT)
    if kind == "empty class":
        (root / "train" / "emu").mkdir()
    elif kind == "unreadable":
        (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    elif kind == "unknown class":
        write_images(root, {"test": {"zebra": 1}})
    elif kind == "sizes":
        Image.new("L", (10, 10)).save(root / "train" / "dog" / "big.png")
    elif kind == "one class":
        for c in ("dog", "owl"):
            shutil.rmtree(root / "train" / c)
    elif kind == "valid dir":
        write_images(root, {"valid": {"cat": 1}})
    elif kind == "unknown dirs":
        (root / "extra").mkdir()
        (root / "more").mkdir()
        (root / ".cache").mkdir()  # hidden: ignored, like hidden files
        (root / "__MACOSX").mkdir()  # left by unzipping on macOS: ignored
    elif kind == "empty split":
        for p in (root / "test").rglob("*.png"):
            p.unlink()
        for p in sorted((root / "test").iterdir()):
            p.rmdir()
    return root


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("empty class", r"^class directory train/emu has no images"),
        ("unreadable", r"^cannot read image train/dog/broken.png: "),
        (
            "unknown class",
            r"^the test split has class 'zebra', which is not in train \(classes: cat, dog, owl\)$",
        ),
        (
            "sizes",
            r"^images differ in size \(train/cat/0.png is 8x8, train/dog/big.png is 10x10\); set "
            r"data.resize=N",
        ),
        ("empty split", r"^the test split is empty"),
        (
            "valid dir",
            r"^\S+/d: unknown directory valid/ \(expected only train/, test/ and an optional val/\); "
            r"validation images go in val/$",
        ),
        (
            "unknown dirs",
            r"^\S+/d: unknown directories extra/, more/ \(expected only train/, test/ and an optional "
            r"val/\)$",
        ),
        ("one class", r"^\S+/d/train: only one class directory \('cat'\); classification needs at least 2$"),
    ],
)
def test_bad_image_folders_are_one_line_data_errors(tmp_path, kind, pattern):
    root = bad(tmp_path, kind)
    with pytest.raises(DataError, match=pattern) as e:
        image.make(tiny_cfg().task, str(root))
    assert "\n" not in str(e.value)


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """convert("L") clips 16-bit pixels at 255, which made every image blank (white)."""
    import numpy as np

    root = write_images(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    wide = np.array([[0, 257, 40000, 65535] * 2] * 8, dtype=np.uint16)
    Image.fromarray(wide).save(root / "train" / "a" / "wide.png")
    assert Image.open(root / "train" / "a" / "wide.png").mode == "I;16"
    expected = np.array([0, 1, 156, 255] * 2, dtype=np.uint8)  # round(v * 255 / 65535)
    for color in ("gray", "rgb"):
        a = image_folders._read(root / "train" / "a" / "wide.png", root, color, 0)
        assert (a == expected[None, :, None]).all(), color
    # a 32-bit integer ("I") image within 0..255 reads as it is, as Pillow's convert("L") read it
    small = Image.fromarray(np.array([[0, 63, 255, 7] * 2] * 8, dtype=np.int32))
    assert (
        small.mode == "I"
        and np.asarray(image_folders._to_8bit(small, root, root))[0].tolist() == [0, 63, 255, 7] * 2
    )
    _, splits, facts = image_folders.load_folders(tiny_cfg().task.data, str(root))
    assert facts["color"] == "gray" and splits["train"][0].max() == 255


@pytest.mark.parametrize(
    "mode, values, pattern",
    [
        (
            "F",
            [0.0, 0.5],
            r"^image train/a/odd.png: mode F \(32-bit float pixels\) is not supported; save it as 8- or "
            r"16-bit grayscale$",
        ),
        (
            "I",
            [0, 300],
            r"^image train/a/odd.png: mode I \(32-bit integer\) pixels range 0..300, whose full scale is "
            r"unknown",
        ),
    ],
)
def test_float_and_out_of_range_wide_images_are_refused_in_one_line(tmp_path, mode, values, pattern):
    import numpy as np

    root = write_images(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    a = np.array([values * 4] * 8, dtype=np.float32 if mode == "F" else np.int32)
    Image.fromarray(a).save(
        root / "train" / "a" / "odd.png", format="TIFF"
    )  # Pillow reads files by content, not suffix
    with pytest.raises(DataError, match=pattern) as e:
        image.make(tiny_cfg().task, str(root))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "key, value, with_val", [("test_fraction", 0.3, False), ("val_fraction", 0.25, True)]
)
def test_fractions_that_image_folders_ignore_are_refused(tmp_path, key, value, with_val):
    """data.test_fraction splits only the bundled digits, and data.val_fraction has no effect when
    val/ exists."""
    root = write_images(tmp_path / "d", LAYOUT)
    if with_val:
        write_images(root, {"val": {"cat": 2}})
    with pytest.raises(
        ConfigError,
        match=rf"^data.{key}={value} has no effect with --data-dir \S+/d: .*; leave it at its default 0.2$",
    ) as e:
        image.make(tiny_cfg({"data": {key: value}}).task, str(root))
    assert "\n" not in str(e.value)
    image.make(tiny_cfg({"data": {key: 0.2}}).task, str(root))  # the default, spelled out, changes nothing
    if with_val:  # without val/, val_fraction is what holds out part of train/
        shutil.rmtree(root / "val")
        assert image.make(tiny_cfg({"data": {key: value}}).task, str(root)).info["images"]["val"] == 4


def test_resize_makes_mixed_sizes_usable(tmp_path):
    root = bad(tmp_path, "sizes")
    task = image.make(tiny_cfg({"data": {"resize": 12}}).task, str(root))
    assert task.info["image_size"] == [12, 12]


def test_cli_reports_a_bad_image_in_one_line(tmp_path):
    root = bad(tmp_path, "unreadable")
    out = tmp_path / "run"
    assert_one_line_error(
        cli("cascade", "image", "--preset", "tiny", "--data-dir", str(root), "--out", str(out)),
        r"topdown: error: cannot read image train/dog/broken.png",
    )
    assert not (out / "checkpoints").exists()
    root = bad(tmp_path / "v", "valid dir")
    assert_one_line_error(
        cli(
            "baseline", "image", "--preset", "tiny", "--data-dir", str(root), "--out", str(tmp_path / "run2")
        ),
        r"topdown: error: \S+: unknown directory valid/ .*; validation images go in val/",
    )
    with pytest.raises(DataError, match=r"^--data-dir .*none: no such directory$"):
        image.make(tiny_cfg().task, str(tmp_path / "none"))
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing the test/ directory"):
        image.make(tiny_cfg().task, str(tmp_path / "none"))


# -- a tiny cascade ---------------------------------------------------------------------------


def test_tiny_cascade_keeps_frozen_blocks_and_batchnorm_statistics_bit_identical(tmp_path):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    summary = run_procedure("cascade", image.make(cfg.task), run, config=cfg, seed=0, preset="tiny")
    assert summary["status"] == "complete" and summary["metric"] == "error"
    assert [s["split"] for s in summary["stages"]] == [None, 3, 2, 1]
    assert summary["task_info"]["classes"] == [str(i) for i in range(10)]
    prefixes = {"stem": "stem.", "stage1": "stages.0.", "stage2": "stages.1.", "head": "head."}
    checked = set()
    for stage in summary["stages"][1:]:
        index = stage["index"]
        start = max(s["index"] for s in summary["stages"][:index] if s["accepted"])
        a = load_file(str(run / "checkpoints" / f"stage-{index}.safetensors"))
        b = load_file(str(run / "checkpoints" / f"stage-{start}.safetensors"))
        frozen = [k for k in a if any(k.startswith(prefixes[blk]) for blk in stage["frozen_blocks"])]
        stats = [k for k in frozen if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert "head.2.running_mean" in stats
        checked.update(stats)
        for k in frozen:
            assert torch.equal(a[k], b[k]), (index, k)
        trained = [k for k in a if any(k.startswith(prefixes[blk]) for blk in stage["trained_blocks"])]
        assert any(not torch.equal(a[k], b[k]) for k in trained if k.endswith("running_mean"))
    assert {
        "stages.0.0.bn2.running_var",
        "stages.1.0.shortcut.1.num_batches_tracked",
    } <= checked  # the last stage froze them
