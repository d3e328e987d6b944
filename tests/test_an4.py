"""AN4 data layer: Sphinx reader, bundle round trip, the vendored bundle, feature helpers."""

import numpy as np
import pytest

from topdown.errors import DataError
from topdown.tasks.asr.an4 import (
    ALPHABET,
    Normalizer,
    add_deltas,
    bundled_path,
    check_text,
    load_bundle,
    load_sphinx,
    read_sphinx_mfc,
    save_bundle,
    stack_frames,
)


def write_mfc(path, feats):
    """Write a Sphinx cepstra file: big-endian int32 float count, then big-endian float32s."""
    flat = np.asarray(feats, dtype=">f4").ravel()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.array([flat.size], dtype=">i4").tobytes() + flat.tobytes())


def make_corpus(root, splits=None, seed=0):
    """A tiny fake AN4 layout: {split: [(fileid, transcript line text), ...]}."""
    rng = np.random.default_rng(seed)
    splits = splits or {
        "train": [
            ("an4_clstk/fash/an1-fash-b", "YES"),
            ("an4_clstk/fash/an2-fash-b", "<s> GO  NOW </s>"),
            ("an4_clstk/mabc/an3-mabc-b", "A B C ONE"),
        ],
        "test": [("an4test_clstk/fxyz/an9-fxyz-b", "ERASE C Q")],
    }
    for split, items in splits.items():
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / f"an4_{split}.fileids").write_text("".join(f"{fid}\n" for fid, _ in items))
        (root / "etc" / f"an4_{split}.transcription").write_text(
            "".join(f"{text} ({fid.rsplit('/', 1)[-1]})\n" for fid, text in items)
        )
        for fid, _ in items:
            write_mfc(root / "feat" / f"{fid}.mfc", rng.normal(size=(int(rng.integers(3, 20)), 13)))
    return root


def assert_same(a, b):
    assert a.keys() == b.keys()
    for split in a:
        assert len(a[split]) == len(b[split])
        for x, y in zip(a[split], b[split]):
            assert (x.uid, x.speaker, x.text) == (y.uid, y.speaker, y.text)
            assert x.feats.dtype == y.feats.dtype == np.float32
            assert x.feats.shape == y.feats.shape and x.feats.tobytes() == y.feats.tobytes()


def test_load_sphinx_and_bundle_round_trip(tmp_path):
    corpus = load_sphinx(make_corpus(tmp_path / "an4"))
    assert [u.uid for u in corpus["train"]] == ["an1-fash-b", "an2-fash-b", "an3-mabc-b"]
    assert [u.speaker for u in corpus["train"]] == ["fash", "fash", "mabc"]
    assert corpus["train"][1].text == "GO NOW"  # markers stripped, whitespace collapsed
    assert corpus["test"][0].feats.shape[1] == 13
    save_bundle(corpus, tmp_path / "b.npz")
    assert_same(corpus, load_bundle(tmp_path / "b.npz"))


def test_bundled_corpus():
    corpus = load_bundle(bundled_path())
    assert [len(corpus[s]) for s in ("train", "test")] == [948, 130]
    assert [len({u.speaker for u in corpus[s]}) for s in ("train", "test")] == [74, 10]
    for utts in corpus.values():
        for u in utts:
            check_text(u.uid, u.text)
            assert u.feats.ndim == 2 and u.feats.shape[1] == 13 and u.feats.dtype == np.float32


def test_bundle_never_unpickles(tmp_path):
    np.savez(tmp_path / "evil.npz", splits=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="evil.npz"):
        load_bundle(tmp_path / "evil.npz")
    with pytest.raises(DataError, match="not found"):
        load_bundle(tmp_path / "absent.npz")


def test_read_sphinx_mfc_errors(tmp_path):
    good = np.arange(26, dtype=np.float32).reshape(2, 13)
    write_mfc(tmp_path / "ok.mfc", good)
    assert np.array_equal(read_sphinx_mfc(tmp_path / "ok.mfc"), good)
    raw = (tmp_path / "ok.mfc").read_bytes()
    cases = {
        "missing.mfc": (None, "not found"),
        "tiny.mfc": (b"\x00\x00", "shorter than"),
        "truncated.mfc": (raw[:-4], "header says 26 floats"),
        "badcount.mfc": (np.array([12], ">i4").tobytes() + np.zeros(12, ">f4").tobytes(), "multiple of 13"),
        "empty.mfc": (np.array([0], ">i4").tobytes(), "zero frames"),
        "nan.mfc": (np.array([13], ">i4").tobytes() + np.full(13, np.nan, ">f4").tobytes(), "non-finite"),
        "littleendian.mfc": (np.array([13], "<i4").tobytes() + np.zeros(13, "<f4").tobytes(), "header says"),
    }
    for name, (data, msg) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=msg) as info:
            read_sphinx_mfc(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)


def test_load_sphinx_errors(tmp_path):
    with pytest.raises(DataError, match="an4_train.fileids"):
        load_sphinx(tmp_path / "nowhere")

    root = make_corpus(tmp_path / "count")
    trans = root / "etc" / "an4_train.transcription"
    trans.write_text("".join(trans.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(DataError, match="3 fileids but 2 transcription"):
        load_sphinx(root)

    root = make_corpus(tmp_path / "ids")
    trans = root / "etc" / "an4_test.transcription"
    trans.write_text(trans.read_text().replace("an9-fxyz-b", "an8-fxyz-b"))
    with pytest.raises(DataError, match="does not match fileid"):
        load_sphinx(root)

    root = make_corpus(tmp_path / "char")
    trans = root / "etc" / "an4_train.transcription"
    trans.write_text(trans.read_text().replace("YES", "YÉS"))
    with pytest.raises(DataError, match=r"utterance an1-fash-b: character 'É' is not in the alphabet"):
        load_sphinx(root)

    root = make_corpus(tmp_path / "latin1")
    trans = root / "etc" / "an4_train.transcription"
    trans.write_bytes(trans.read_text().replace("YES", "YÉS").encode("latin-1"))
    with pytest.raises(
        DataError, match=r"an4_train.transcription: not UTF-8 text \(invalid continuation byte at byte \d+\)"
    ):
        load_sphinx(root)

    root = make_corpus(tmp_path / "empty", {"train": [("an4_clstk/fash/an1-fash-b", "YES")], "test": []})
    with pytest.raises(DataError, match="split 'test' is empty"):
        load_sphinx(root)

    root = make_corpus(tmp_path / "nofeat")
    (root / "feat" / "an4_clstk" / "mabc" / "an3-mabc-b.mfc").unlink()
    with pytest.raises(DataError, match="an3-mabc-b.mfc: feature file not found"):
        load_sphinx(root)

    root = make_corpus(tmp_path / "corrupt")
    mfc = root / "feat" / "an4test_clstk" / "fxyz" / "an9-fxyz-b.mfc"
    mfc.write_bytes(mfc.read_bytes()[:-6])
    with pytest.raises(DataError, match="an9-fxyz-b.mfc: header says"):
        load_sphinx(root)


def test_check_text():
    check_text("u", "A B" + ALPHABET)
    for text, msg in [
        ("", "empty transcript"),
        ("   ", "empty transcript"),
        ("yes", "character 'y'"),
        ("NO.", r"character '\.'"),
    ]:
        with pytest.raises(DataError, match=msg):
            check_text("u", text)


def test_add_deltas_on_ramp():
    t = np.arange(10, dtype=np.float32)
    feats = np.stack([3 * t + 1, -t], axis=1)  # slopes 3 and -1
    out = add_deltas(feats, window=2)
    assert out.shape == (10, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :2], feats)
    np.testing.assert_allclose(
        out[2:-2, 2:4], np.tile([3.0, -1.0], (6, 1)), atol=1e-6
    )  # interior delta = slope
    np.testing.assert_allclose(out[4:-4, 4:6], 0.0, atol=1e-6)  # constant delta -> zero delta-delta
    # at the first frame edge padding gives (1*(x1-x0) + 2*(x2-x0)) / 10 = 5 * slope / 10
    np.testing.assert_allclose(out[0, 2:4], [1.5, -0.5], atol=1e-6)
    assert add_deltas(np.zeros((1, 13), np.float32)).shape == (1, 39)


def test_stack_frames():
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    out = stack_frames(x, 3)
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[1], x[3:6].ravel())
    assert stack_frames(x, 1).shape == (7, 3)
    short = stack_frames(x[:2], 4)
    assert short.shape == (1, 12)
    np.testing.assert_array_equal(short[0, 6:], np.concatenate([x[1], x[1]]))
    assert stack_frames(x[:0], 2).shape == (0, 6)


def test_normalizer():
    rng = np.random.default_rng(1)
    arrays = [rng.normal(5.0, 3.0, size=(n, 4)).astype(np.float32) for n in (10, 50, 7)]
    arrays[0][:, 3] = arrays[1][:, 3] = arrays[2][:, 3] = 2.0  # a constant dimension must not divide by 0
    norm = Normalizer.fit(arrays)
    assert norm.mean.dtype == norm.std.dtype == np.float32
    out = np.concatenate([norm(a) for a in arrays])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, :3].std(axis=0), 1.0, atol=1e-5)
    assert np.all(out[:, 3] == 0.0)
