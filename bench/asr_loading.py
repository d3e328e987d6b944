"""ASR data-loading throughput, side by side (utterances per second, one process, one thread).

    OMP_NUM_THREADS=1 .venv/bin/python bench/asr_loading.py [--utts 300] [--work /tmp/asr-loading]

Measured, on the same machine and run:
1. the bundled AN4 (``topdown/data/an4/an4.npz``, precomputed Sphinx cepstra): reading the bundle;
2. the original AN4 Sphinx layout (``.mfc`` files), if ``--an4`` (default ../shared/data/an4) exists;
3. a Kaldi data directory of audio (``wav.scp``; 16 kHz 16-bit WAV): reading the audio with
   soundfile and computing 80-dim log-mel filterbanks with kaldi-native-fbank — the feature
   extraction a user's own corpus goes through;
4. the same features stored as a Kaldi archive (``feats.scp``/``.ark``) read with kaldiio;
5. the task-level preparation that follows any of them (deltas, training-set normalisation):
   ``data.prepare`` on the bundled AN4.

The audio is synthetic (AN4 ships no audio): noise-excited tones whose durations follow the
AN4 training set's (its frame counts / 100 s), so that per-utterance cost matches AN4's.
Loading cost does not depend on what is said.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topdown.tasks import resolve_config  # noqa: E402
from topdown.tasks.asr import an4, data, kaldi  # noqa: E402
from topdown.tasks.asr.filterbank import Fbank  # noqa: E402


def timed(fn, repeat: int = 1):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utts", type=int, default=300, help="utterances in the generated Kaldi directory")
    parser.add_argument("--work", default="/tmp/asr-loading", help="scratch directory (recreated)")
    parser.add_argument("--an4", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "an4"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import kaldiio
    import soundfile as sf

    rows = []
    corpus, t = timed(lambda: an4.load_bundle(an4.bundled_path()), repeat=3)
    n = sum(len(v) for v in corpus.values())
    audio_s = sum(len(u.feats) for v in corpus.values() for u in v) / 100
    rows.append(("AN4 bundle (npz, precomputed cepstra)", n, t, audio_s))

    if (Path(args.an4) / "etc").is_dir():
        corpus2, t = timed(lambda: an4.load_sphinx(args.an4))
        rows.append(("AN4 Sphinx layout (.mfc files)", sum(len(v) for v in corpus2.values()), t, audio_s))

    cfg = resolve_config("asr-rnn", "demo", {})
    (_, info, _), t = timed(lambda: data.prepare(cfg.task.data, None))
    rows.append(
        (
            "AN4 bundle + deltas + CMVN + stacking (data.prepare)",
            sum(info["utterances"].values()),
            t,
            audio_s,
        )
    )

    # A Kaldi directory of audio with AN4's utterance durations.
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    d = work / "train"
    (d / "wav").mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = [len(u.feats) for u in corpus["train"]]
    durations = [frames[i] / 100 for i in rng.choice(len(frames), args.utts)]
    rate = 16000
    with open(d / "wav.scp", "w") as scp, open(d / "text", "w") as text:
        for i, seconds in enumerate(durations):
            uid = f"spk{i % 10}-utt{i:04d}"
            t_axis = np.arange(int(seconds * rate)) / rate
            wave = 0.2 * np.sin(2 * np.pi * (150 + i) * t_axis) * (1 + rng.standard_normal(len(t_axis)) * 0.3)
            path = d / "wav" / f"{uid}.wav"
            sf.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")
            scp.write(f"{uid} {path}\n")
            text.write(f"{uid} HELLO\n")
    fbank_cfg = Fbank()
    (utts, facts), t = timed(lambda: kaldi.load_dir(d, fbank_cfg))
    wav_audio_s = sum(durations)
    rows.append(
        (
            f"Kaldi wav.scp -> 80-dim fbank (soundfile + kaldi-native-fbank), {rate} Hz",
            len(utts),
            t,
            wav_audio_s,
        )
    )

    # The same features as a Kaldi archive, read back with kaldiio.
    f = work / "feats"
    f.mkdir()
    kaldiio.save_ark(str(f / "feats.ark"), {u.uid: u.feats for u in utts}, scp=str(f / "feats.scp"))
    shutil.copy(d / "text", f / "text")
    (utts2, _), t = timed(lambda: kaldi.load_dir(f, fbank_cfg), repeat=3)
    rows.append(("Kaldi feats.scp/ark (kaldiio), 80-dim fbank", len(utts2), t, wav_audio_s))

    print(
        f"# ASR loading throughput ({platform.processor() or platform.machine()}, 1 thread, torch "
        f"{torch.__version__})\n"
    )
    print("| source | utterances | seconds | utterances/s | audio seconds per second |")
    print("|---|---|---|---|---|")
    for name, count, seconds, audio in rows:
        print(f"| {name} | {count} | {seconds:.2f} | {count / seconds:,.0f} | {audio / seconds:,.0f} |")
    json.dump(
        [dict(zip(("source", "utterances", "seconds", "audio_seconds"), r)) for r in rows],
        open(work / "results.json", "w"),
        indent=1,
    )


if __name__ == "__main__":
    main()
