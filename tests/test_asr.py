"""ASR beyond the bundled AN4: Kaldi data directories (feats.scp, wav.scp), the Transformer's
blocks, CTC prefix beam search, SpecAugment masking, presets."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, read_summary
from safetensors.torch import load_file

import topdown
from topdown import Blocks, CascadeConfig, TrainConfig
from topdown.cli import main
from topdown.tasks import resolve_config, task_module
from topdown.tasks.asr import an4, kaldi, ngram, rnn, transformer
from topdown.tasks.asr.data import BLANK, SpecAugment, Vocab, load_corpus, normalise, spec_augment
from topdown.tasks.asr.decoding import WordScorer, beam_decode, error_rates, greedy_decode, prefix_beam_search
from topdown.tasks.asr.filterbank import Fbank

sf = pytest.importorskip("soundfile")
kaldiio = pytest.importorskip("kaldiio")
pytest.importorskip("kaldi_native_fbank")

TRAIN = [
    "YES NO",
    "NO",
    "GO",
    "NO GO",
    "NO YES",
    "YES",
    "GO",
    "YES GO",
]  # a held-out speaker's characters occur elsewhere
TEST = ["NO", "GO YES"]


def tone(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.05 * rng.standard_normal(len(t))).astype(
        np.float32
    )


def kaldi_dir(
    path: Path,
    texts: list[str],
    *,
    rate: int = 8000,
    flac_every: int = 3,
    seconds: float = 1.0,
    speakers: int = 4,
    first: int = 0,
) -> Path:
    """A Kaldi data directory of generated audio (WAV, every third file FLAC), text and utt2spk."""
    (path / "audio").mkdir(parents=True, exist_ok=True)
    text, scp, spk = [], [], []
    for i, words in enumerate(texts, first):
        uid = f"s{i % speakers}-u{i:03d}"
        audio = path / "audio" / f"{uid}.{'flac' if i % flac_every == 2 else 'wav'}"
        sf.write(str(audio), tone(seconds, rate, i), rate)
        text.append(f"{uid} {words}")
        scp.append(f"{uid} {audio}")
        spk.append(f"{uid} s{i % speakers}")
    (path / "text").write_text("\n".join(text) + "\n")
    (path / "wav.scp").write_text("\n".join(scp) + "\n")
    (path / "utt2spk").write_text("\n".join(spk) + "\n")
    return path


def kaldi_root(root: Path, dev: bool = True, **kw) -> Path:
    kaldi_dir(root / "train", TRAIN, **kw)
    if dev:
        kaldi_dir(root / "dev", TRAIN[:3], first=100, **kw)
    kaldi_dir(root / "test", TEST, first=200, **kw)
    return root


TINY_T = [
    "asr-transformer",
    "--preset",
    "tiny",
    "--set",
    "data.fbank.num_mel_bins=23",
    "--set",
    "decode.beam=2",
]


def run_main(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("topdown: error:"), err[-2000:]
    assert re.search(pattern, lines[-1]), lines[-1]


# -- Kaldi data directories ------------------------------------------------------------------


def test_wav_scp_directory_trains_and_stores_vocab_and_statistics(tmp_path, capsys):
    data = kaldi_root(tmp_path / "data")
    run = tmp_path / "r"
    code, err = run_main(
        capsys, "baseline", *TINY_T, "--set", "train.epochs=1", "--data-dir", str(data), "--out", str(run)
    )
    assert code == 0, err
    summary = read_summary(run)
    info = summary["task_info"]
    assert info["vocab"] == ["<blank>", " ", "E", "G", "N", "O", "S", "Y"]
    assert info["features"]["source"] == "wav.scp" and info["features"]["sample_rate"] == 8000
    assert info["features"]["raw_dim"] == 23 and len(info["cmvn"]["mean"]) == len(info["cmvn"]["std"]) == 69
    assert info["utterances"] == {"train": 8, "val": 3, "test": 2}  # dev/ is the validation set
    assert {"wer", "cer", "wer_beam", "cer_beam", "loss"} == set(summary["test"])
    # the statistics are those of the training features only, and travel with the checkpoint
    meta = __import__("safetensors").safe_open(str(run / "checkpoints" / "best.safetensors"), "pt").metadata()
    assert '"cmvn"' in meta["task_info"] and '"vocab"' in meta["task_info"]
    assert load_file(str(run / "checkpoints" / "best.safetensors"))["output.weight"].shape[0] == 8


def test_feats_scp_directory_without_dev_holds_out_speakers(tmp_path, capsys):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, texts in (("train", TRAIN), ("test", TEST)):
        d = root / split
        d.mkdir(parents=True)
        mats = {
            f"s{i % 4}-u{i}": rng.standard_normal((60 + 3 * i, 20)).astype(np.float32)
            for i in range(len(texts))
        }
        kaldiio.save_ark(str(d / "feats.ark"), mats, scp=str(d / "feats.scp"))
        (d / "text").write_text("".join(f"{u} {t}\n" for u, t in zip(mats, texts)))
        (d / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in mats))
    run = tmp_path / "r"
    code, err = run_main(
        capsys,
        "baseline",
        "asr-rnn",
        "--preset",
        "tiny",
        "--set",
        "data.val_speakers=1",
        "--data-dir",
        str(root),
        "--out",
        str(run),
    )
    assert code == 0, err
    info = read_summary(run)["task_info"]
    assert info["features"]["source"] == "feats.scp" and info["features"]["dim"] == 20 * 3 * 4
    assert info["utterances"] == {
        "train": 6,
        "val": 2,
        "test": 2,
    }  # one of 4 speakers (2 utterances) held out
    assert "note:" not in err
    # on a corpus of one's own the default preset is the own-corpus recipe, not the demo
    # (bench/RESULTS.md), and it says so
    code, err = run_main(
        capsys,
        "baseline",
        "asr-rnn",
        "--set",
        "data.val_speakers=1",
        "--set",
        "model.hidden=4",
        "--set",
        "train.epochs=1",
        "--set",
        "train.min_epoch_steps=1",
        "--set",
        "decode.beam=0",
        "--data-dir",
        str(root),
        "--out",
        str(tmp_path / "own"),
    )
    assert code == 0 and "using --preset bench" in err, err
    assert read_summary(tmp_path / "own")["preset"] == "bench"


def damage(root: Path, kind: str) -> str:
    """Break the data directory at ``root`` in one way; returns the expected error pattern."""
    train = root / "train"
    if kind == "malformed":
        (train / "wav.scp").write_text((train / "wav.scp").read_text() + "lonely-id\n")
        return r"wav\.scp:9: expected '<utterance-id> <value>'"
    if kind == "missing audio":
        next((train / "audio").glob("*.wav")).unlink()
        return r"audio file .*\.wav not found"
    if kind == "empty text":
        (train / "text").write_text("")
        return r"text: file is empty"
    if kind == "empty transcript":
        lines = (train / "text").read_text().splitlines()
        (train / "text").write_text("\n".join([lines[0].split()[0], *lines[1:]]) + "\n")
        return r"has an empty transcript"
    if kind == "rate mismatch":
        wav = sorted((train / "audio").glob("*.wav"))[1]
        sf.write(str(wav), tone(1.0, 16000, 1), 16000)
        return r"sample rate 16000 Hz differs from 8000 Hz"
    if kind == "unseen character":
        (root / "test" / "text").write_text((root / "test" / "text").read_text().replace("GO YES", "GO YES!"))
        return r"character '!' does not occur in the training transcripts"
    if kind == "corrupt audio":
        next((train / "audio").glob("*.flac")).write_bytes(b"not audio at all")
        return r"cannot read audio file"
    if kind == "piped":
        (train / "wav.scp").write_text((train / "wav.scp").read_text().replace(".wav\n", ".wav |\n", 1))
        return r"only plain audio file paths"
    if kind == "no text for audio":
        lines = (train / "text").read_text().splitlines()
        (train / "text").write_text("\n".join(lines[1:]) + "\n")
        return r"no transcript for 1 utterance"
    if kind == "nan sample":
        wav = train / "audio" / "s1-u001.wav"
        wave = tone(0.3, 8000, 1)
        wave[100] = np.nan
        sf.write(str(wav), wave, 8000, subtype="FLOAT")
        return (
            r"wav\.scp: utterance 's1-u001': audio file .*s1-u001\.wav holds 1 non-finite sample\(s\) "
            r"\(NaN or inf; first at sample 100\)"
        )
    if kind == "segments":
        (train / "segments").write_text("s0-u000 rec1 0.0 0.2\n")
        return (
            r"train/segments: segment files are not supported; cut the recordings into one file per utterance"
        )
    if kind == "space in path":
        wav = train / "audio" / "s0-u000.wav"
        wav.rename(train / "audio" / "s0 u000.wav")
        (train / "wav.scp").write_text(
            (train / "wav.scp").read_text().replace(str(wav), str(train / "audio" / "s0 u000.wav"))
        )
        return r"utterance 's0-u000': the path '.*/s0 u000\.wav' has a space, which wav\.scp cannot hold"
    if kind == "command without pipe":
        wav = train / "audio" / "s0-u000.wav"
        (train / "wav.scp").write_text(
            (train / "wav.scp").read_text().replace(str(wav), f"sox {wav} -t wav -")
        )
        return r"only plain audio file paths are supported, got 'sox .* -t wav -'"
    if kind == "all silent":
        for audio in (train / "audio").iterdir():
            sf.write(str(audio), np.zeros(2400, np.float32), 8000)
        return r"train: all 8 utterances are silent \(constant audio, e\.g\. all-zero samples\)"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "malformed",
        "missing audio",
        "empty text",
        "empty transcript",
        "rate mismatch",
        "unseen character",
        "corrupt audio",
        "piped",
        "no text for audio",
        "nan sample",
        "segments",
        "space in path",
        "command without pipe",
        "all silent",
    ],
)
def test_bad_kaldi_data_is_a_one_line_error(tmp_path, capsys, kind):
    data = kaldi_root(tmp_path / "data", dev=False, seconds=0.3)
    pattern = damage(data, kind)
    run = tmp_path / "r"
    one_line_error(
        *run_main(
            capsys,
            "baseline",
            *TINY_T,
            "--set",
            "data.val_speakers=1",
            "--data-dir",
            str(data),
            "--out",
            str(run),
        ),
        pattern,
    )
    assert not run.exists()


FBANK_MISFITS = [  # (sample rate, data.fbank settings, the error)
    (4000, {}, r"data\.fbank\.num_mel_bins=80 is too many at 4000 Hz .* allowed: at most (\d+)"),
    (2000, {}, r"data\.fbank\.num_mel_bins=80 is too many at 2000 Hz .* allowed: at most (\d+)"),
    (
        16000,
        {"num_mel_bins": 300},
        r"data\.fbank\.num_mel_bins=300 is too many at 16000 Hz .* allowed: at most (\d+)",
    ),
    (
        8000,
        {"high_freq": 7600},
        r"data\.fbank\.high_freq=7600 is above the Nyquist frequency 4000 Hz at 8000 Hz .*allowed: low_freq "
        r"< high_freq <= 4000",
    ),
    (
        16000,
        {"high_freq": 9000},
        r"data\.fbank\.high_freq=9000 is above the Nyquist frequency 8000 Hz at 16000 Hz",
    ),
    (
        16000,
        {"low_freq": 9000},
        r"data\.fbank\.low_freq=9000 is not below the Nyquist frequency 8000 Hz at 16000 Hz .*allowed: 0 <= "
        r"low_freq < 8000",
    ),
    (16000, {"low_freq": 8000}, r"data\.fbank\.low_freq=8000 is not below the Nyquist frequency 8000 Hz"),
    (
        16000,
        {"high_freq": -9000},
        r"data\.fbank\.high_freq=-9000 \(the Nyquist frequency 8000 Hz - 9000 = -1000 Hz\) is not above "
        r"data\.fbank\.low_freq=20",
    ),
    (
        16000,
        {"low_freq": 300, "high_freq": 200},
        r"data\.fbank\.high_freq=200 is not above data\.fbank\.low_freq=300 at 16000 Hz",
    ),
    (
        16000,
        {"frame_length_ms": 0.01},
        r"data\.fbank\.frame_length_ms=0\.01 is a window of 0 sample\(s\) at 16000 Hz .*allowed: at least 2 "
        r"samples",
    ),
    (
        16000,
        {"frame_length_ms": 0.2},
        r"data\.fbank\.frame_length_ms=0\.2 is too short for any mel filterbank at 16000 Hz .*allowed: "
        r"longer frames",
    ),
    (
        16000,
        {"frame_shift_ms": 0.01},
        r"data\.fbank\.frame_shift_ms=0\.01 is a shift of 0 samples at 16000 Hz .*allowed: at least 1 sample",
    ),
    (16000, {"num_mel_bins": 2}, r"data\.fbank\.num_mel_bins.*2.*3"),
]


@pytest.mark.parametrize(
    "rate, fbank, pattern",
    FBANK_MISFITS,
    ids=[f"{r}Hz-{','.join(f'{k}={v}' for k, v in f.items()) or 'defaults'}" for r, f, _ in FBANK_MISFITS],
)
def test_fbank_options_that_do_not_fit_the_sample_rate_are_one_line_errors(
    tmp_path, capsys, rate, fbank, pattern
):
    """Any one sample rate is accepted, but kaldi-native-fbank's options must fit it: a setting that does
    not is an error naming the option, its value, the rate and what is allowed, before any training."""
    data = kaldi_root(tmp_path / "data", dev=False, rate=rate, seconds=0.3)
    sets = [a for k, v in fbank.items() for a in ("--set", f"data.fbank.{k}={v}")]
    run = tmp_path / "r"
    code, err = run_main(
        capsys,
        "baseline",
        "asr-rnn",
        "--preset",
        "tiny",
        "--set",
        "data.val_speakers=1",
        *sets,
        "--data-dir",
        str(data),
        "--out",
        str(run),
    )
    one_line_error(code, err, pattern)
    assert not run.exists()
    most = re.search(pattern, err.strip().splitlines()[-1]).groups()
    if most:  # the largest filterbank the message allows is accepted
        corpus, _ = kaldi.load_root(data, Fbank.from_dict({**fbank, "num_mel_bins": int(most[0])}))
        assert corpus["train"][0].feats.shape[1] == int(most[0])


def test_kaldi_files_with_a_byte_order_mark_load_as_without(tmp_path):
    """A UTF-8 byte order mark at the start of a Kaldi file is not part of the first utterance id."""
    data = kaldi_root(tmp_path / "data", dev=False, seconds=0.3)
    plain, facts = kaldi.load_root(data, Fbank())
    for name in ("text", "utt2spk", "wav.scp"):
        path = data / "train" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    marked, marked_facts = kaldi.load_root(data, Fbank())
    assert marked_facts == facts
    for a, b in zip(plain["train"], marked["train"], strict=True):
        assert (a.uid, a.speaker, a.text) == (b.uid, b.speaker, b.text) and np.array_equal(a.feats, b.feats)


def test_silent_utterances_are_a_one_line_warning(tmp_path, capsys):
    """A few silent files can be legitimate, so they are counted in a warning (all of train silent
    is an error)."""
    data = kaldi_root(tmp_path / "data", dev=False, seconds=0.3)
    for uid in ("s1-u001", "s3-u003"):
        sf.write(str(data / "train" / "audio" / f"{uid}.wav"), np.zeros(2400, np.float32), 8000)
    kaldi.load_root(data, Fbank())
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"topdown: warning: 2 of 8 utterance(s) in {data / 'train'} are silent (constant audio, e.g. "
        "all-zero samples; first: 's1-u001')"
    ]


def test_messages_name_the_config_key_and_the_directory_given(tmp_path, capsys):
    data = kaldi_root(tmp_path / "data", dev=False, seconds=0.3)
    one_line_error(
        *run_main(
            capsys,
            "baseline",
            *TINY_T,
            "--set",
            "data.val_speakers=8",
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "r"),
        ),
        r"data\.val_speakers=8, but the training set has 4 speakers .*allowed: 1 to 3",
    )
    data = kaldi_root(tmp_path / "dev-data", seconds=0.3)
    (data / "dev" / "text").write_text(
        (data / "dev" / "text").read_text().replace("s2-u102 GO", "s2-u102 GO!")
    )
    one_line_error(
        *run_main(capsys, "baseline", *TINY_T, "--data-dir", str(data), "--out", str(tmp_path / "r")),
        r"error: utterance s2-u102 \(dev\): character '!'",
    )


def test_unseen_characters_map_to_unk_when_configured_and_the_cli_exits_nonzero_otherwise(tmp_path, capsys):
    data = kaldi_root(tmp_path / "data", seconds=0.6)
    damage(data, "unseen character")
    proc = cli("baseline", *TINY_T, "--data-dir", str(data), "--out", str(tmp_path / "bad"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("topdown: error: utterance s1-u201 (test): character '!'")
    )
    run = tmp_path / "r"
    code, err = run_main(
        capsys,
        "baseline",
        *TINY_T,
        "--set",
        "train.epochs=1",
        "--set",
        "data.unk=<unk>",
        "--data-dir",
        str(data),
        "--out",
        str(run),
    )
    assert code == 0, err
    assert read_summary(run)["task_info"]["vocab"][-1] == "<unk>"


def test_remove_tokens_strips_non_linguistic_symbols_and_leaves_out_utterances_with_no_words(
    tmp_path, capsys
):
    data = tmp_path / "data"
    kaldi_dir(
        data / "train", ["YES <NOISE> NO", "NO", "<NOISE>", "GO", "NO GO", "NO YES", "YES", "GO", "YES GO"]
    )
    kaldi_dir(data / "dev", TRAIN[:3], first=100)
    kaldi_dir(data / "test", ["<NOISE> NO", "GO YES"], first=200)
    cfg = resolve_config(
        "asr-rnn", "tiny", {"data": {"remove_tokens": ["<NOISE>"], "fbank": {"num_mel_bins": 23}}}
    ).task.data
    corpus = load_corpus(cfg, str(data))
    assert [u.text for u in corpus.splits["train"]][:3] == ["YES NO", "NO", "GO"] and len(
        corpus.splits["train"]
    ) == 8
    assert [u.text for u in corpus.splits["test"]] == ["NO", "GO YES"]
    assert "<" not in "".join(corpus.vocab.symbols[1:]) and corpus.facts["removed_tokens"] == ["<NOISE>"]
    assert (
        "data.remove_tokens left 1 of 9 utterance(s) of train with no words (first: 's2-u002')"
        in capsys.readouterr().err
    )
    with pytest.raises(topdown.ConfigError, match="data.remove_tokens must be a list of words"):
        resolve_config("asr-rnn", "tiny", {"data": {"remove_tokens": ["A B"]}})


def test_vocab_encode_decode():
    vocab = Vocab.from_texts(["AB", "B C"], unk="?")
    assert vocab.symbols == ["<blank>", " ", "A", "B", "C", "?"]
    assert vocab.encode("CAB", "x").tolist() == [4, 2, 3]
    assert vocab.encode("AZ", "x").tolist() == [2, 5]
    assert vocab.decode([0, 2, 0, 3, 1, 4]) == "AB C"
    spelled = Vocab.from_texts(
        ["AB"], unk="<unk>"
    )  # one edit for one unseen character, however unk is spelled
    assert spelled.decode([1, 3, 2]) == "A\ufffdB" and error_rates(["A\ufffdB"], ["AZB"])[
        "cer"
    ] == pytest.approx(1 / 3)
    # spaces at an utterance's edge or doubled between words are no character errors (WER does not
    # see them either)
    assert error_rates([" AB  C "], ["AB C"]) == {"wer": 0.0, "cer": 0.0}
    assert error_rates(["AB D"], ["AB C"]) == {"wer": 0.5, "cer": 0.25}
    with pytest.raises(topdown.DataError, match="character 'Z'"):
        Vocab.from_texts(["AB"]).encode("AZ", "utt")


# -- the Transformer's blocks ------------------------------------------------------------------


def tiny_transformer_task(limit: int = 24, conv_kernel: int = 0) -> topdown.Task:
    cfg = resolve_config(
        "asr-transformer", "tiny", {"data": {"limit": limit}, "model": {"conv_kernel": conv_kernel}}
    )
    return transformer.make(cfg.task)


def test_transformer_blocks_cover_the_model_and_match_the_subsampling():
    cfg = resolve_config("asr-transformer", "tiny", {}).task
    model = transformer.build_model(cfg, inputs=39, vocab=28)
    blocks = Blocks(model, transformer.block_names(cfg.model))
    assert blocks.names == ["frontend", "layer1", "layer2", "output"]
    assert blocks.parameter_names()["output"] == ["norm.weight", "norm.bias", "output.weight", "output.bias"]
    feats, lengths = torch.randn(3, 41, 39), torch.tensor([41, 30, 7])
    logits, out = model(feats, lengths)
    assert logits.shape == (3, transformer.out_length(41), 28)
    assert out.tolist() == [transformer.out_length(n) for n in (41, 30, 7)] == [9, 6, 1]


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["transformer", "conformer"])
def test_frozen_transformer_blocks_are_bit_identical_and_deterministic(tmp_path, conv_kernel):
    task = tiny_transformer_task(conv_kernel=conv_kernel)
    model = task.build_model()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # make dropout matter
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.5
    blocks = Blocks(model, task.blocks)
    frozen = ["layer2", "output"]
    blocks.freeze(frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for batch in itertools.islice(task.train_batches(torch.Generator().manual_seed(0), 1.0), 2):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key in blocks.state_keys(frozen):
        assert torch.equal(before[key], after[key]), key
        assert model.get_parameter(key).grad is None
    assert not torch.equal(before["frontend.proj.weight"], after["frontend.proj.weight"])
    # frozen blocks run in eval mode (LayerNorm has no running statistics; dropout is off) ...
    assert not any(m.training for m in model.encoder[1].modules()) and not model.norm.training
    assert model.encoder[0].training
    x = torch.randn(2, 5, 32)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(model.encoder[1](x, pad), model.encoder[1](x, pad))
    assert not torch.equal(model.encoder[0](x, pad), model.encoder[0](x, pad))
    # ... unless dropout in frozen blocks is asked for
    blocks.freeze(frozen, frozen_dropout=True)
    model.train()
    assert not torch.equal(model.encoder[1](x, pad), model.encoder[1](x, pad))


def test_conformer_layers_ignore_padding_frames():
    """model.conv_kernel > 0: Conformer layers; what a padded utterance's frames hold (here noise)
    changes nothing in its outputs, since attention masks them and the convolution sees zeros."""
    cfg = resolve_config("asr-transformer", "tiny", {"model": {"conv_kernel": 5}}).task
    model = transformer.build_model(cfg, inputs=39, vocab=28).eval()
    assert isinstance(model.encoder[0], transformer.ConformerLayer)
    feats, lengths = torch.randn(2, 81, 39), torch.tensor([81, 50])
    noisy = feats.clone()
    noisy[1, 50:] = 10 * torch.randn(31, 39)
    n = transformer.out_length(50)
    assert torch.allclose(model(feats, lengths)[0][1, :n], model(noisy, lengths)[0][1, :n], atol=1e-5)
    with pytest.raises(topdown.ConfigError, match="conv_kernel must be odd"):
        resolve_config("asr-transformer", "tiny", {"model": {"conv_kernel": 4}})


@pytest.mark.parametrize("training", [True, False])
def test_blstm_layer_is_the_packed_bidirectional_lstm(training):
    """Each direction on padded input (the fast CPU kernel) computes what torch's bidirectional
    LSTM computes on the packed sequences, outputs and gradients, with zeros on padding frames;
    in eval mode too, as a frozen layer above a trained one runs in a cascade stage."""
    torch.manual_seed(0)
    layer = rnn.BLSTMLayer(inputs=5, hidden=4, dropout=0.0).train(training)
    feats, lengths = torch.randn(3, 9, 5, requires_grad=True), torch.tensor([6, 9, 2])
    out, out_lengths = layer(feats, lengths)
    packed = torch.nn.utils.rnn.pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
    reference = torch.nn.utils.rnn.pad_packed_sequence(
        layer.lstm(packed)[0], batch_first=True, total_length=9
    )[0]
    assert out_lengths is lengths and torch.allclose(out, reference, atol=1e-6)
    assert out[0, 6:].abs().sum() == 0 and out[2, 2:].abs().sum() == 0
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [feats, *layer.parameters()])
    expected = torch.autograd.grad((reference * weights).sum(), [feats, *layer.parameters()])
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected))
    assert grads[0][2, 2:].abs().sum() == 0  # padding frames reach nothing


def test_pyramidal_blstm_halves_the_frame_rate_and_ignores_padding():
    """model.subsample=[2]: above lstm1 each pair of frames is one (an odd length rounds up), the
    layers above see twice the width, and what a padded utterance's frames hold changes nothing."""
    cfg = resolve_config("asr-rnn", "tiny", {"model": {"subsample": [2]}}).task
    model = rnn.build_model(cfg, inputs=39, vocab=28).eval()
    hidden = cfg.model.hidden
    assert model.encoder[1].lstm.input_size == 4 * hidden and model.output.in_features == 2 * hidden
    feats, lengths = torch.randn(2, 41, 39), torch.tensor([41, 30])
    logits, out = model(feats, lengths)
    assert logits.shape == (2, 21, 28) and out.tolist() == [21, 15]
    noisy = feats.clone()
    noisy[1, 30:] = 10 * torch.randn(11, 39)
    assert torch.allclose(model(noisy, lengths)[0][1, :15], logits[1, :15], atol=1e-6)
    with pytest.raises(topdown.ConfigError, match="3 factors for 2 layers"):
        resolve_config("asr-rnn", "tiny", {"model": {"subsample": [2, 1, 1]}})
    with pytest.raises(topdown.ConfigError, match="model.subsample"):
        resolve_config("asr-rnn", "tiny", {"model": {"subsample": [0]}})
    # a reduction that leaves an utterance fewer frames than CTC needs is named before training
    with pytest.raises(topdown.DataError, match="too few for its"):
        rnn.make(resolve_config("asr-rnn", "tiny", {"model": {"subsample": [4, 4]}}).task)


def test_transformer_cascade_keeps_the_classifier_and_reinitialises_the_feature_extractor(tmp_path):
    task = tiny_transformer_task()
    run = tmp_path / "run"
    topdown.cascade(
        task, run, train=TrainConfig(epochs=1, lr=0.001), cascade=CascadeConfig(splits=[2]), seed=0
    )
    s0, s1 = (load_file(str(run / "checkpoints" / f"stage-{i}.safetensors")) for i in (0, 1))
    blocks = Blocks(task.build_model(), task.blocks)
    for key in blocks.state_keys(["layer2", "output"]):
        assert torch.equal(s0[key], s1[key]), key
    for key in blocks.state_keys(["frontend", "layer1"]):
        if key.endswith("weight") and "norm" not in key:
            assert not torch.equal(s0[key], s1[key]), key


def test_paper_presets_build():
    for name, params in (("asr-transformer", 20e6), ("asr-rnn", 8e6)):
        cfg = resolve_config(name, "paper", {}).task
        module = task_module(name)
        model = module.build_model(cfg, inputs=80 * (3 if cfg.data.deltas else 1) * cfg.data.stack, vocab=40)
        n = sum(p.numel() for p in model.parameters())
        assert 0.5 * params < n < 2 * params, (name, n)


# -- decoding --------------------------------------------------------------------------------


def peaked(frames: int, symbols: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (20 * torch.randn(frames, symbols, generator=g)).log_softmax(-1).numpy()


def test_beam_one_equals_greedy_on_peaked_posteriors():
    """Prefix beam search with one hypothesis keeps the best prefix, not the best path, so
    it can differ from greedy decoding when a frame's probability mass is spread (see the
    next test); on confident posteriors, like a trained model's, the two agree."""
    vocab = Vocab(list(" ABCDEFG"))
    for seed in range(50):
        lp = torch.from_numpy(peaked(30, len(vocab), seed))
        greedy = greedy_decode(lp[None], torch.tensor([30]), vocab)
        assert beam_decode(lp[None], torch.tensor([30]), vocab, beam=1) == greedy, seed


def test_beam_search_merges_paths_that_greedy_cannot():
    lp = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))  # paths "a a", "a _", "_ a" all give "a": 0.64 > 0.36
    assert prefix_beam_search(lp, beam=1) == []
    assert prefix_beam_search(lp, beam=2) == [1]


def test_wide_beam_finds_the_most_probable_labelling():
    """With a beam wide enough to keep everything, the result is the exact arg-max over labellings."""
    for seed in range(5):
        lp = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)).log_softmax(-1).numpy()
        scores: dict[tuple, float] = {}
        for path in itertools.product(range(3), repeat=4):
            label = tuple(s for s, _ in itertools.groupby(path) if s != 0)
            scores[label] = scores.get(label, 0.0) + math.exp(sum(lp[t, s] for t, s in enumerate(path)))
        best = max(scores, key=scores.get)
        assert tuple(prefix_beam_search(lp, beam=100, prune=math.inf)) == best


def test_word_ngram_is_a_distribution_for_seen_and_unseen_histories():
    lm = ngram.WordNgram(["GO TO A", "GO TO B", "ENTER A B"], order=3)
    words = ["GO", "TO", "A", "B", "ENTER", ngram.END]
    for history in [(), ("GO",), ("GO", "TO"), ("ENTER", "A"), ("NEVER", "SEEN")]:
        total = sum(math.exp(lm.logprob(history, w)) for w in words) + math.exp(lm.logprob(history, "UNSEEN"))
        assert total == pytest.approx(1.0), history
    assert lm.logprob(("GO",), "TO") > lm.logprob(("GO",), "A")  # seen bigram above unseen
    assert lm.logprob((), "GO") > lm.logprob((), "TO")  # sentences start with GO or ENTER


def spelled(text: str, vocab: Vocab, wrong: dict[int, str]) -> np.ndarray:
    """Posteriors that spell ``text`` one symbol per frame, separated by blanks; at the character
    positions in ``wrong`` the acoustics slightly prefer another character."""
    rows = []
    for i, c in enumerate(text):
        row = np.full(len(vocab), 1e-4)
        if i in wrong:
            row[vocab.index[wrong[i]]], row[vocab.index[c]] = 0.55, 0.45
        else:
            row[vocab.index[c]] = 1.0
        rows += [row, np.eye(len(vocab))[BLANK] * 0.999 + 1e-4]
    return np.log(np.array(rows) / np.array(rows).sum(1, keepdims=True))


def test_word_lm_fusion_corrects_a_spelling_the_acoustics_get_wrong():
    vocab = Vocab(list(" ABCDEGNORT"))
    lm = ngram.WordNgram(["GO TO A", "GO TO B", "ENTER A", "GO BACK"] * 3, order=2)
    lp = spelled("GO TO A", vocab, wrong={3: "O"})  # "TO" heard slightly more as "OO"
    decode = lambda scorer: vocab.decode(prefix_beam_search(lp, beam=8, scorer=scorer))  # noqa: E731
    assert decode(None) == "GO OO A"
    assert decode(WordScorer(lm, vocab.symbols, vocab.index[" "], weight=1.0, bonus=0.0)) == "GO TO A"
    # weight 0 and no bonus rank exactly as the plain search does
    assert decode(WordScorer(lm, vocab.symbols, vocab.index[" "], weight=0.0, bonus=0.0)) == "GO OO A"


def test_oov_penalty_is_charged_once_per_word_outside_the_lexicon_and_keeps_the_beam_in_it():
    vocab = Vocab(list(" ABCDEGNORT"))
    lm = ngram.WordNgram(["GO TO A", "GO TO B", "ENTER A", "GO BACK"] * 3, order=2)
    assert lm.words == {"GO", "TO", "A", "B", "ENTER", "BACK"}
    scorer = WordScorer(lm, vocab.symbols, vocab.index[" "], weight=0.0, bonus=0.0, oov_penalty=5.0)

    def penalty(text: str) -> float:
        state = ((), "", 0.0)
        for c in text:
            state = scorer.extend(state, vocab.index[c])
        return -scorer.final(state)

    assert penalty("GO TO B") == penalty("ENTER A") == 0.0
    assert penalty("GO OO A") == 5.0  # "OO" leaves the lexicon at its first letter and is charged once
    assert (
        penalty("BAC TOO") == 10.0
    )  # "BAC" only begins a word (charged at its end); "TOO" leaves at its last letter
    lp = spelled("GO TO A", vocab, wrong={3: "O"})
    decode = lambda scorer: vocab.decode(prefix_beam_search(lp, beam=8, scorer=scorer))  # noqa: E731
    assert decode(dataclasses.replace(scorer, oov_penalty=0.0)) == "GO OO A"  # weight 0: the acoustics alone
    assert decode(scorer) == "GO TO A"


def test_word_lm_needs_the_beam_search():
    with pytest.raises(topdown.ConfigError, match="decode.lm_order needs the beam search"):
        resolve_config("asr-rnn", "tiny", {"decode": {"lm_order": 3}})


def test_tiny_run_reports_beam_and_lm_error_rates_next_to_greedy(tmp_path):
    proc = cli(
        "baseline",
        "asr-rnn",
        "--preset",
        "tiny",
        "--set",
        "decode.beam=4",
        "--set",
        "decode.lm_order=2",
        "--out",
        str(tmp_path / "run"),
        check=True,
    )
    test = read_summary(tmp_path / "run")["test"]
    assert {"wer", "cer", "wer_beam", "cer_beam", "wer_lm", "cer_lm"} <= set(test), proc.stdout


def test_spec_augment_masks_within_lengths_and_is_seeded():
    feats, lengths = torch.ones(2, 50, 10), torch.tensor([50, 20])
    cfg = SpecAugment(freq_masks=2, freq_width=3, time_masks=2, time_width=10)
    torch.manual_seed(0)
    a = spec_augment(feats, lengths, cfg)
    torch.manual_seed(0)
    assert torch.equal(a, spec_augment(feats, lengths, cfg))
    assert (a == 0).any() and torch.equal(feats, torch.ones(2, 50, 10))
    assert spec_augment(feats, lengths, cfg.replace(freq_masks=0, time_masks=0)) is feats
    # time masks alone: whole frames inside each utterance's length, never its padding, each span at
    # most time_width
    for masks in (1, 3):
        zeroed = [False, False]
        for seed in range(8):
            torch.manual_seed(seed)
            t = spec_augment(feats, lengths, cfg.replace(freq_masks=0, time_masks=masks))
            frames = (t == 0).all(-1)  # (B, T): a masked frame is zero in every dimension
            assert torch.equal(t == 0, frames[..., None].expand_as(t)) and ((t == 0) | (t == 1)).all()
            for b, n in enumerate(lengths.tolist()):
                assert not frames[b, n:].any(), (masks, seed, b)  # frames beyond the length untouched
                zeroed[b] |= bool(frames[b, :n].any())
                if masks == 1:  # one span: its run of masked frames is at most the configured width
                    assert frames[b].sum() <= cfg.time_width, (seed, b)
                    idx = frames[b].nonzero().flatten()
                    assert len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx)  # contiguous
        assert all(zeroed), masks  # each utterance had a frame inside its length masked


def test_readme_worked_example_runs(tmp_path, monkeypatch, capsys):
    """docs/asr.md's worked example (a Kaldi corpus of generated audio) is real code and a real command."""
    import shlex
    import subprocess
    import sys

    from conftest import ROOT

    doc = (ROOT / "docs" / "asr.md").read_text()
    example = doc.split("### Worked example", 1)[1]
    code = re.findall(r"```python\n(.*?)```", example, re.S)[0]
    command = re.findall(r"```\n(topdown .*?)\n```", example, re.S)[0]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, *shlex.split(command)[1:])
    assert code == 0, err[-2000:]
    info = read_summary(tmp_path / "runs" / "my-corpus")["task_info"]
    assert info["vocab"] == ["<blank>", " ", "E", "N", "O", "S", "Y"]
    assert len(info["cmvn"]["mean"]) == 80 and info["features"]["sample_rate"] == 16000


def test_cmvn_per_speaker_and_per_utterance_use_their_own_statistics():
    rng = np.random.default_rng(0)
    utts = [an4.Utterance(f"u{i}", f"s{i % 2}", np.zeros((1, 1), np.float32), "A") for i in range(4)]
    feats = [(rng.standard_normal((30, 3)) * (1 + i) + 10 * (i % 2)).astype(np.float32) for i in range(4)]
    train = an4.Normalizer.fit(feats)
    assert np.allclose(normalise(utts, feats, "global", train)[1], train(feats[1]))
    by_speaker = normalise(utts, feats, "speaker", train)
    for s in (0, 1):
        x = np.concatenate(by_speaker[s::2])
        assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)
    for x in normalise(utts, feats, "utterance", train):
        assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)


def test_spec_augment_bands_cover_the_same_dimensions_of_each_stacked_frame():
    feats, lengths = torch.ones(3, 40, 4 * 6), torch.tensor([40, 30, 20])
    torch.manual_seed(0)
    a = spec_augment(feats, lengths, SpecAugment(freq_masks=2, freq_width=3), stack=4)
    masked = (a == 0).view(3, 40, 4, 6)
    assert (
        masked.any() and (masked == masked[:, :, :1]).all()
    )  # the same dims in each of the 4 stacked frames
