"""Kaldi-style data directories: ``text``, ``feats.scp`` or ``wav.scp``, ``utt2spk``.

A corpus root holds ``train/``, ``test/`` and optionally ``dev/``, each a Kaldi data
directory:

* ``text`` (required): ``<utterance-id> <transcript>`` per line;
* ``feats.scp``: ``<utterance-id> <rxspecifier>`` (e.g. ``feats.ark:1234``), read with
  kaldiio; or else ``wav.scp``: ``<utterance-id> <path>`` to a WAV/FLAC file (plain paths
  only, no piped commands), read with soundfile and turned into log-mel filterbank
  features with kaldi-native-fbank (``topdown.tasks.asr.filterbank``); one file per
  utterance (a ``segments`` file, which cuts utterances out of longer recordings, is refused);
* ``utt2spk`` (optional): ``<utterance-id> <speaker>``; without it each utterance is its
  own speaker (Kaldi's convention).

Every problem is a one-line :class:`~topdown.errors.DataError` naming the file and line.
The audio libraries are imported only when a directory needs them (the ``asr`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from topdown.console import warn
from topdown.errors import DataError
from topdown.task import text_lines
from topdown.tasks.asr.an4 import Utterance
from topdown.tasks.asr.filterbank import Fbank, fbank, fbank_options

SPLITS = ("train", "dev", "test")


def read_table(path: Path, *, allow_empty_value: bool = False) -> dict[str, str]:
    """``<key> <value...>`` lines into an ordered dict; blank lines are skipped. A leading UTF-8
    byte order mark (as some Windows editors write) is dropped, not read as part of the first key."""
    lines = text_lines(path)
    table: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, *rest = line.split(maxsplit=1)  # a space or a tab separates the key
        value = " ".join(rest[0].split()) if rest else ""
        if not value and not allow_empty_value:
            raise DataError(f"{path}:{number}: expected '<utterance-id> <value>', got {line.strip()!r}")
        if key in table:
            raise DataError(f"{path}:{number}: utterance {key!r} appears twice")
        table[key] = value
    if not table:
        raise DataError(f"{path}: file is empty")
    return table


def read_text(path: Path) -> dict[str, str]:
    """Transcripts; an utterance with no words is an error (CTC needs a target)."""
    table = read_table(path, allow_empty_value=True)
    for uid, text in table.items():
        if not text:
            raise DataError(f"{path}: utterance {uid!r} has an empty transcript")
    return table


def read_audio(path: Path, where: str) -> tuple[np.ndarray, int]:
    """A mono float32 waveform and its sample rate (multi-channel audio: the first channel)."""
    import soundfile as sf

    if not path.is_file():
        raise DataError(f"{where}: audio file {path} not found")
    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own LibsndfileError, RuntimeError, ...
        raise DataError(f"{where}: cannot read audio file {path} ({' '.join(str(e).split())})") from None
    if len(wave) == 0:
        raise DataError(f"{where}: audio file {path} holds no samples")
    bad = np.flatnonzero(~np.isfinite(wave[:, 0]))
    if len(bad):  # a float WAV can hold NaN or inf, which would make every feature of the file NaN
        raise DataError(
            f"{where}: audio file {path} holds {len(bad)} non-finite sample(s) (NaN or inf; first at sample "
            f"{bad[0]}); samples must be finite"
        )
    return wave[:, 0], int(rate)


def _path_like(spec: str, data_dir: Path) -> bool:
    """Whether a wav.scp entry with a space is a file path (it exists, or it ends in an audio file
    extension), not a command such as ``sox in.sph -t wav -`` whose trailing ``|`` was forgotten."""
    import soundfile as sf

    if "|" in spec:
        return False
    suffix = Path(spec).suffix.lstrip(".").lower()
    return (
        Path(spec).exists()
        or (data_dir / spec).exists()
        or suffix in {f.lower() for f in sf.available_formats()}
    )


def _check_same_keys(text: dict[str, str], other: dict[str, str], text_path: Path, other_path: Path) -> None:
    missing = [u for u in text if u not in other]
    if missing:
        raise DataError(
            f"{other_path}: no entry for {len(missing)} utterance(s) of {text_path.name} (first: "
            f"{missing[0]!r})"
        )
    extra = [u for u in other if u not in text]
    if extra:
        raise DataError(
            f"{text_path}: no transcript for {len(extra)} utterance(s) of {other_path.name} (first: "
            f"{extra[0]!r})"
        )


def load_dir(path: Path, fbank_cfg: Fbank) -> tuple[list[Utterance], dict[str, Any]]:
    """One Kaldi data directory -> utterances (features (frames, dims) float32) and facts about it
    (``source``: feats or wav; ``sample_rate`` for audio; ``silent``: the ids of utterances with
    constant audio or identical feature frames)."""
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found")
    text_path = path / "text"
    text = read_text(text_path)
    spk_path = path / "utt2spk"
    speakers = read_table(spk_path) if spk_path.is_file() else {u: u for u in text}
    if spk_path.is_file():
        _check_same_keys(text, speakers, text_path, spk_path)
    if (path / "feats.scp").is_file():
        utts, facts = _read_feats_scp(path / "feats.scp", text_path, text, speakers)
    elif (path / "wav.scp").is_file():
        utts, facts = _read_wav_scp(path / "wav.scp", text_path, text, speakers, fbank_cfg)
    else:
        raise DataError(f"{path}: neither feats.scp nor wav.scp found")
    dims = {u.feats.shape[1] for u in utts}
    if len(dims) > 1:
        raise DataError(f"{path}: utterances have different feature dimensions {sorted(dims)}")
    return utts, facts


def _read_feats_scp(
    feats_path: Path, text_path: Path, text: dict[str, str], speakers: dict[str, str]
) -> tuple[list[Utterance], dict[str, Any]]:
    """The utterances of a directory whose features are given (``feats.scp``, read with kaldiio)."""
    import kaldiio

    scp = read_table(feats_path)
    _check_same_keys(text, scp, text_path, feats_path)
    utts, silent = [], []
    for uid in text:
        where = f"{feats_path}: utterance {uid!r}"
        try:
            mat = kaldiio.load_mat(scp[uid])
        except FileNotFoundError as e:
            raise DataError(f"{where}: {e.filename or scp[uid]} not found") from None
        except Exception as e:  # kaldiio raises ValueError, OSError, ... on corrupt archives
            raise DataError(
                f"{where}: cannot read {scp[uid]!r} ({type(e).__name__}: {' '.join(str(e).split())})"
            ) from None
        mat = np.asarray(mat)
        if mat.ndim != 2 or mat.shape[0] == 0:
            raise DataError(f"{where}: expected a non-empty (frames, dims) matrix, got shape {mat.shape}")
        if (mat == mat[0]).all():
            silent.append(uid)
        utts.append(Utterance(uid, speakers[uid], _finite(mat.astype(np.float32), where), text[uid]))
    return utts, {"silent": silent, "source": "feats.scp"}


def _read_wav_scp(
    wav_path: Path, text_path: Path, text: dict[str, str], speakers: dict[str, str], fbank_cfg: Fbank
) -> tuple[list[Utterance], dict[str, Any]]:
    """The utterances of a directory of audio files (``wav.scp``), as filterbank features; all at
    one sample rate."""
    path = wav_path.parent
    if (
        path / "segments"
    ).is_file():  # Kaldi's segments cut utterances out of longer recordings; we read whole files
        raise DataError(
            f"{path / 'segments'}: segment files are not supported; cut the recordings into one file per "
            "utterance (e.g. with Kaldi's extract-segments) and list those in wav.scp"
        )
    scp = read_table(wav_path)
    _check_same_keys(text, scp, text_path, wav_path)
    utts, silent = [], []
    rate0 = first = opts = None
    for uid in text:
        spec = scp[uid]
        where = f"{wav_path}: utterance {uid!r}"
        if spec.endswith("|") or (" " in spec and not _path_like(spec, path)):
            raise DataError(
                f"{where}: only plain audio file paths are supported, got {spec!r} (convert piped commands "
                "to files first)"
            )
        if " " in spec:
            raise DataError(
                f"{where}: the path {spec!r} has a space, which wav.scp cannot hold (Kaldi splits its lines "
                "at spaces); rename or link the file to a path without spaces"
            )
        audio = Path(spec)
        if not audio.is_absolute() and not audio.exists() and (path / spec).exists():
            audio = (
                path / spec
            )  # Kaldi resolves relative paths from the current directory; we also try the data directory
        wave, rate = read_audio(audio, where)
        if wave.min() == wave.max():
            silent.append(uid)
        if rate0 is None:
            rate0, first = rate, uid
        elif rate != rate0:
            raise DataError(
                f"{where}: sample rate {rate} Hz differs from {rate0} Hz of {first!r}; resample the "
                "directory to one rate"
            )
        if opts is None:
            opts = fbank_options(fbank_cfg, rate, f"{audio}, the first file of {wav_path}")
        feats = fbank(wave, opts)
        if len(feats) == 0:
            raise DataError(f"{where}: audio is shorter than one {fbank_cfg.frame_length_ms} ms frame")
        utts.append(Utterance(uid, speakers[uid], _finite(feats, where), text[uid]))
    return utts, {"silent": silent, "source": "wav.scp", "sample_rate": rate0}


def _finite(x: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(x).all():
        raise DataError(f"{where}: features contain non-finite values (NaN or inf)")
    return x


def _report_silence(path: Path, silent: list[str], total: int, source: str, *, train: bool) -> None:
    """Silent utterances carry no speech: a few can be legitimate (a warning), a training set of
    nothing else cannot teach the model anything (an error)."""
    if not silent:
        return
    what = (
        "constant audio, e.g. all-zero samples" if source == "wav.scp" else "every frame's features identical"
    )
    if train and len(silent) == total:
        raise DataError(f"{path}: all {total} utterances are silent ({what}); there is no speech to train on")
    warn(
        f"warning: {len(silent)} of {total} utterance(s) in {path} are silent ({what}; first: {silent[0]!r})"
    )


def load_root(root: Path, fbank_cfg: Fbank) -> tuple[dict[str, list[Utterance]], dict[str, Any]]:
    """``ROOT/{train,dev,test}`` -> {"train", "dev" (if present), "test"} and facts (source, sample rate)."""
    corpus: dict[str, list[Utterance]] = {}
    facts: dict[str, Any] = {}
    for split in SPLITS:
        if split == "dev" and not (root / split).is_dir():
            continue
        if not (root / split).is_dir():
            raise DataError(
                f"{root}: no {split}/ data directory (expected {root}/train, {root}/test and optionally "
                f"{root}/dev)"
            )
        corpus[split], facts[split] = load_dir(root / split, fbank_cfg)
    sources = {f["source"] for f in facts.values()}
    if len(sources) > 1:
        raise DataError(f"{root}: data directories mix feats.scp and wav.scp")
    rates = {s: f["sample_rate"] for s, f in facts.items() if "sample_rate" in f}
    if len(set(rates.values())) > 1:
        raise DataError(
            f"{root}: sample rates differ between data directories "
            f"({', '.join(f'{s} {r} Hz' for s, r in rates.items())})"
        )
    dims = {s: u[0].feats.shape[1] for s, u in corpus.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"{root}: feature dimensions differ between data directories ({dims})")
    for split, f in facts.items():
        _report_silence(root / split, f["silent"], len(corpus[split]), f["source"], train=split == "train")
    return corpus, {"source": sources.pop(), **({"sample_rate": next(iter(rates.values()))} if rates else {})}
