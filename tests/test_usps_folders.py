"""bench/usps_folders.py: both published forms of the USPS digits become the same image folders, which
the image task reads back pixel for pixel."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import usps_folders  # noqa: E402

pytest.importorskip("PIL")


def _published(tmp_path, rng):
    """Synthetic files of the published shapes: the text form (levels in [-1, 1], three decimals, many
    exactly half-way between two 8-bit levels) and the HDF5 form's arrays (float32 in [0, 1])."""
    forms = {}
    for split, n in usps_folders.SIZES.items():
        levels = rng.integers(-1000, 1001, size=(n, 256)) / 1000
        digits = rng.permutation(np.arange(n) % 10)  # every digit present
        path = tmp_path / f"zip.{split}.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(f"{d} " + " ".join(f"{v:.3f}" for v in row) + "\n" for d, row in zip(digits, levels))
        forms[split] = (path, ((levels + 1) / 2).astype(np.float32), digits)
    return forms


def test_text_and_hdf5_forms_give_the_same_folders_and_the_task_reads_them(tmp_path, monkeypatch):
    from topdown.tasks.image import Data
    from topdown.tasks.image_folders import load_folders

    monkeypatch.setattr(usps_folders, "SIZES", {"train": 60, "test": 40})  # the published sizes, scaled down
    forms = _published(tmp_path, np.random.default_rng(0))
    assert (
        usps_folders.main(
            ["--gz", str(forms["train"][0]), str(forms["test"][0]), "--out", str(tmp_path / "a")]
        )
        == 0
    )
    h5 = {s: (grey.astype(np.float64), digits) for s, (_, grey, digits) in forms.items()}
    monkeypatch.setattr(usps_folders, "read_h5", lambda path: h5)
    assert usps_folders.main(["--h5", "unused.h5", "--out", str(tmp_path / "b")]) == 0
    a, b = sorted((tmp_path / "a").rglob("*.png")), sorted((tmp_path / "b").rglob("*.png"))
    assert len(a) == 60 + 40 and [p.relative_to(tmp_path / "a") for p in a] == [
        p.relative_to(tmp_path / "b") for p in b
    ]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))

    _, splits, _ = load_folders(Data(), str(tmp_path / "a"))
    x_test, y_test = splits["test"]
    expected = np.floor(forms["test"][1].astype(np.float64) * 255 + 0.5 + usps_folders.TIE)
    order = np.argsort(forms["test"][2], kind="stable")  # the folders list images digit by digit
    assert np.array_equal(y_test.numpy(), forms["test"][2][order])
    assert np.array_equal(x_test.reshape(40, 256).numpy(), expected[order])


def test_a_file_of_another_size_or_a_used_output_directory_is_refused(tmp_path):
    small = tmp_path / "zip.train.gz"
    with gzip.open(small, "wt") as f:
        f.write("3 " + " ".join(["0.5"] * 256) + "\n")
    with pytest.raises(SystemExit, match="expected 7291 images"):
        usps_folders.main(["--gz", str(small), str(small), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="not empty"):
        usps_folders.main(["--gz", str(small), str(small), "--out", str(tmp_path)])
