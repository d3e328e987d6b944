"""CMU AN4 (census) speech corpus: Sphinx cepstra, transcripts, a compact bundle, feature helpers.

Two on-disk forms are read:
* the original Sphinx layout (``etc/an4_{train,test}.{fileids,transcription}`` and
  ``feat/<fileid>.mfc``), as distributed by CMU;
* a single ``.npz`` bundle (written by :func:`save_bundle`) that the package vendors so that a
  fresh clone runs without the original corpus.
Every problem with the data is reported as a one-line :class:`~topdown.errors.DataError`.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from topdown.errors import DataError
from topdown.task import text_lines

SPLITS = ("train", "test")
N_CEPS = 13
ALPHABET = " ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ALLOWED = frozenset(ALPHABET)
_TRANSCRIPT_LINE = re.compile(r"^(.*)\((\S+)\)\s*$")
_MARKERS = re.compile(r"</?s>")


@dataclass(frozen=True)
class Utterance:
    """One recorded utterance: its id, speaker, cepstra (frames, 13) float32 and transcript."""

    uid: str
    speaker: str
    feats: np.ndarray
    text: str


def check_text(uid: str, text: str) -> None:
    """Reject transcripts the character-level models cannot represent, naming the utterance."""
    if not text.strip():
        raise DataError(f"utterance {uid}: empty transcript")
    for ch in text:
        if ch not in _ALLOWED:
            raise DataError(f"utterance {uid}: character {ch!r} is not in the alphabet (A-Z and space)")


def read_sphinx_mfc(path) -> np.ndarray:
    """Read a Sphinx cepstra file (big-endian int32 float count, then big-endian float32s).

    Every check exists because a truncated or foreign file would otherwise yield garbage frames.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    data = path.read_bytes()
    if len(data) < 4:
        raise DataError(f"{path}: file is {len(data)} bytes, shorter than the 4-byte header")
    count = int(np.frombuffer(data, dtype=">i4", count=1)[0])
    have = (len(data) - 4) / 4
    if count != have:
        raise DataError(
            f"{path}: header says {count} floats but the file holds {have:g} "
            "(truncated, or not a big-endian Sphinx cepstra file)"
        )
    if count % N_CEPS:
        raise DataError(f"{path}: {count} floats is not a multiple of {N_CEPS} coefficients")
    if count == 0:
        raise DataError(f"{path}: file holds zero frames")
    feats = np.frombuffer(data, dtype=">f4", offset=4).astype(np.float32).reshape(-1, N_CEPS)
    if not np.isfinite(feats).all():
        raise DataError(f"{path}: contains non-finite values (NaN or inf)")
    return feats


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines of a control file; a missing file is a DataError, not a traceback."""
    lines = text_lines(path, missing="file not found (expected the AN4 Sphinx layout with etc/ and feat/)")
    return [ln.strip() for ln in lines if ln.strip()]


def _load_split(root: Path, split: str) -> list[Utterance]:
    """Pair fileids with transcripts line by line, checking that both name the same utterance."""
    fileids = _read_lines(root / "etc" / f"an4_{split}.fileids")
    trans_path = root / "etc" / f"an4_{split}.transcription"
    lines = _read_lines(trans_path)
    if not fileids:
        raise DataError(f"{root}: split '{split}' is empty")
    if len(fileids) != len(lines):
        raise DataError(
            f"{root}: split '{split}' has {len(fileids)} fileids but {len(lines)} transcription lines"
        )
    utts = []
    for fileid, line in zip(fileids, lines):
        m = _TRANSCRIPT_LINE.match(line)
        if m is None:
            raise DataError(f"{trans_path}: line {line!r} is not of the form 'TEXT (utterance-id)'")
        text, tid = " ".join(_MARKERS.sub(" ", m.group(1)).split()), m.group(2)
        parts = fileid.split("/")
        uid = parts[-1]
        if tid != uid:
            raise DataError(f"{trans_path}: transcript id {tid!r} does not match fileid {fileid!r}")
        check_text(uid, text)
        speaker = parts[-2] if len(parts) > 1 else uid
        utts.append(Utterance(uid, speaker, read_sphinx_mfc(root / "feat" / f"{fileid}.mfc"), text))
    return utts


def load_sphinx(root) -> dict[str, list[Utterance]]:
    """Read the original CMU layout into {"train": [...], "test": [...]}."""
    root = Path(root)
    return {split: _load_split(root, split) for split in SPLITS}


def save_bundle(corpus: dict[str, list[Utterance]], path) -> None:
    """Write the corpus as one compressed .npz of plain arrays (no pickled objects)."""
    arrays = {"splits": np.array(list(corpus), dtype=str)}
    for split, utts in corpus.items():
        lengths = [len(u.feats) for u in utts]
        arrays[f"{split}_feats"] = np.concatenate([u.feats for u in utts]).astype(np.float32)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for field in ("uid", "speaker", "text"):
            arrays[f"{split}_{field}s"] = np.array([getattr(u, field) for u in utts], dtype=str)
    with open(path, "wb") as f:  # a file object keeps numpy from appending its own suffix
        np.savez_compressed(f, **arrays)


def load_bundle(path) -> dict[str, list[Utterance]]:
    """Read a bundle written by save_bundle; never unpickles, and checks its internal consistency."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: bundle not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz bundle ({e})") from None
    try:
        corpus = {}
        for split in (str(s) for s in arrays["splits"]):
            feats, offsets = arrays[f"{split}_feats"], arrays[f"{split}_offsets"]
            uids, spks, texts = (arrays[f"{split}_{k}"] for k in ("uids", "speakers", "texts"))
            n = len(uids)
            if (
                n == 0
                or len(offsets) != n + 1
                or len(spks) != n
                or len(texts) != n
                or offsets[0] != 0
                or offsets[-1] != len(feats)
                or (np.diff(offsets) <= 0).any()
            ):
                raise DataError(f"{path}: split '{split}' is empty or its arrays are inconsistent")
            corpus[split] = [
                Utterance(str(uids[i]), str(spks[i]), feats[offsets[i] : offsets[i + 1]], str(texts[i]))
                for i in range(n)
            ]
    except KeyError as e:
        raise DataError(f"{path}: bundle lacks array {e}") from None
    return corpus


def bundled_path() -> Path:
    """Where the package vendors the AN4 bundle, so that a clone runs without the original corpus."""
    return Path(__file__).resolve().parents[2] / "data" / "an4" / "an4.npz"


def _deltas(x: np.ndarray, window: int) -> np.ndarray:
    """Regression deltas d_t = sum_n n (x_{t+n} - x_{t-n}) / (2 sum_n n^2), edges repeated."""
    t = len(x)
    padded = np.pad(x, ((window, window), (0, 0)), mode="edge")
    num = sum(
        n * (padded[window + n : window + n + t] - padded[window - n : window - n + t])
        for n in range(1, window + 1)
    )
    return num / (2 * sum(n * n for n in range(1, window + 1)))


def add_deltas(feats: np.ndarray, window: int = 2) -> np.ndarray:
    """Append delta and delta-delta coefficients: (T, D) -> (T, 3D), the usual cepstral front end."""
    if feats.ndim != 2 or window < 1:
        raise ValueError(
            f"add_deltas needs a (frames, dims) array and window >= 1, got {feats.shape}, {window}"
        )
    x = feats.astype(np.float64)
    d = _deltas(x, window)
    return np.concatenate([x, d, _deltas(d, window)], axis=1).astype(np.float32)


def stack_frames(feats: np.ndarray, n: int) -> np.ndarray:
    """Stack n consecutive frames and keep every n-th: (T, D) -> (T//n, D*n), shortening the sequence.

    The remainder is dropped; an utterance shorter than n is padded with its last frame so that
    it still yields one frame.
    """
    if feats.ndim != 2 or n < 1:
        raise ValueError(f"stack_frames needs a (frames, dims) array and n >= 1, got {feats.shape}, {n}")
    t, d = feats.shape
    if 0 < t < n:
        feats = np.pad(feats, ((0, n - t), (0, 0)), mode="edge")
    keep = (len(feats) // n) * n
    return feats[:keep].reshape(-1, n * d)


@dataclass
class Normalizer:
    """Per-dimension mean/variance normalisation, fitted on training frames only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, arrays: list[np.ndarray]) -> Normalizer:
        """Statistics over all frames of all arrays (a constant dimension gets std 1)."""
        x = np.concatenate(arrays).astype(np.float64)
        std = x.std(axis=0)
        std[std < 1e-8] = 1.0
        return cls(x.mean(axis=0).astype(np.float32), std.astype(np.float32))

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        """Normalise one (frames, dims) array."""
        return ((feats - self.mean) / self.std).astype(np.float32)
