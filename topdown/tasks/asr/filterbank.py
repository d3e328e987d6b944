"""The log-mel filterbank front end for ``wav.scp`` audio: its options (``data.fbank``), checked
against the audio's sample rate before any features are computed, and the features themselves, by
kaldi-native-fbank (Kaldi's ``compute-fbank``, reimplemented; imported only when audio needs it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from topdown.errors import ConfigError
from topdown.sections import Section, option


@dataclass(frozen=True)
class Fbank(Section):
    """The log-mel filterbank front end for ``wav.scp`` audio (kaldi-native-fbank's options)."""

    SECTION: ClassVar[str] = "data.fbank"
    num_mel_bins: int = option(80, ge=3)  # kaldi-native-fbank needs at least 3
    frame_length_ms: float = option(25.0, gt=0)
    frame_shift_ms: float = option(10.0, gt=0)
    low_freq: float = option(20.0, ge=0)
    high_freq: float = 0.0  # 0 = Nyquist; negative = Nyquist minus this
    dither: float = option(0.0, ge=0)  # Kaldi's default is 1.0; 0 keeps features deterministic
    preemph_coeff: float = option(0.97, ge=0, le=1)
    window_type: str = option(
        "povey", choices=("povey", "hamming", "hanning", "rectangular", "blackman", "sine")
    )
    snip_edges: bool = True


def _knf_options(cfg: Fbank, rate: int, num_bins: int | None = None):
    """kaldi-native-fbank's options for ``cfg`` at ``rate`` (``num_bins`` in place of num_mel_bins)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(rate)
    opts.frame_opts.frame_length_ms = float(cfg.frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(cfg.frame_shift_ms)
    opts.frame_opts.dither = float(cfg.dither)
    opts.frame_opts.preemph_coeff = float(cfg.preemph_coeff)
    opts.frame_opts.window_type = str(cfg.window_type)
    opts.frame_opts.snip_edges = bool(cfg.snip_edges)
    opts.mel_opts.num_bins = int(cfg.num_mel_bins if num_bins is None else num_bins)
    opts.mel_opts.low_freq = float(cfg.low_freq)
    opts.mel_opts.high_freq = float(cfg.high_freq)
    return opts


def _samples(rate: int, ms: float) -> int:
    """Samples in ``ms`` milliseconds, computed in float32 as kaldi-native-fbank does (its frame
    sizes), so that the checks below agree with the library at the boundaries."""
    return int(np.float32(rate) * np.float32(0.001) * np.float32(ms))


def fbank_options(cfg: Fbank, rate: int, where: str):
    """kaldi-native-fbank's options for audio at ``rate``, checked once before any features are
    computed: any one sample rate is accepted, but some ``data.fbank`` settings do not fit a rate
    (a band above its Nyquist frequency, more mel filters than FFT bins), and the library would
    stop with a bare ValueError, or a division by zero for a zero-sample shift. ``where`` names
    the audio the rate came from."""
    at = f"at {rate} Hz ({where})"
    length, shift = cfg.frame_length_ms, cfg.frame_shift_ms
    if _samples(rate, length) < 2:
        raise ConfigError(
            f"data.fbank.frame_length_ms={length:g} is a window of {_samples(rate, length)} sample(s) {at}; "
            f"allowed: at least 2 samples ({2000 / rate:.4g} ms; 25 is usual)"
        )
    if _samples(rate, shift) < 1:
        raise ConfigError(
            f"data.fbank.frame_shift_ms={shift:g} is a shift of 0 samples {at}; "
            f"allowed: at least 1 sample ({1000 / rate:.4g} ms; 10 is usual)"
        )
    nyquist, low, high = rate / 2, cfg.low_freq, cfg.high_freq
    band = (
        high if high > 0 else nyquist + high
    )  # Kaldi: 0 = the Nyquist frequency, negative = below it by that much
    if low >= nyquist:
        raise ConfigError(
            f"data.fbank.low_freq={low:g} is not below the Nyquist frequency {nyquist:g} Hz {at}; "
            f"allowed: 0 <= low_freq < {nyquist:g}"
        )
    if high > nyquist:
        raise ConfigError(
            f"data.fbank.high_freq={high:g} is above the Nyquist frequency {nyquist:g} Hz {at}; "
            f"allowed: low_freq < high_freq <= {nyquist:g}, or 0 for the Nyquist frequency, or a negative "
            "offset from it"
        )
    if band <= low:
        meaning = f" (the Nyquist frequency {nyquist:g} Hz - {-high:g} = {band:g} Hz)" if high <= 0 else ""
        raise ConfigError(
            f"data.fbank.high_freq={high:g}{meaning} is not above data.fbank.low_freq={low:g} {at}; "
            f"allowed: high_freq in ({low:g}, {nyquist:g}], or 0, or a negative offset above "
            f"{low - nyquist:g}"
        )
    bins = int(cfg.num_mel_bins)
    refusal = _refusal(cfg, rate, bins)  # building the mel filters is where the rest is checked
    if refusal and "mel" not in refusal:
        raise ConfigError(
            f"kaldi-native-fbank refuses the data.fbank options {at}: {refusal} (options: "
            f"{dataclasses.asdict(cfg)})"
        )
    if refusal:
        fits = next((n for n in range(bins - 1, 2, -1) if _refusal(cfg, rate, n) is None), None)
        if fits is None:
            raise ConfigError(
                f"data.fbank.frame_length_ms={length:g} is too short for any mel filterbank {at}: "
                "no filter gets an FFT bin; allowed: longer frames (25 is usual)"
            )
        raise ConfigError(
            f"data.fbank.num_mel_bins={bins} is too many {at} with {length:g} ms frames and a "
            f"{low:g}-{band:g} Hz band (some filters would get no FFT bin); allowed: at most {fits}, "
            "or longer frames (data.fbank.frame_length_ms)"
        )
    return _knf_options(cfg, rate)


def _refusal(cfg: Fbank, rate: int, num_bins: int) -> str | None:
    """kaldi-native-fbank's reason to refuse ``num_bins`` mel filters with ``cfg`` at ``rate``
    (None: it accepts them).
    Its constructor is the only source of the rule that every filter must get an FFT bin."""
    import kaldi_native_fbank as knf

    try:
        knf.OnlineFbank(_knf_options(cfg, rate, num_bins))
    except (ValueError, RuntimeError) as e:
        return " ".join(str(e).split())
    return None


def fbank(wave: np.ndarray, opts) -> np.ndarray:
    """Kaldi-compatible log-mel filterbank features (frames, num_mel_bins) of a mono waveform,
    with options from :func:`fbank_options`.

    ``wave`` is float in [-1, 1]; it is scaled to the 16-bit integer range first, as Kaldi
    reads WAV samples, so that the energy floor means what it means in Kaldi.
    """
    import kaldi_native_fbank as knf

    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(opts.frame_opts.samp_freq, (wave * 32768.0).astype(np.float32))
    computer.input_finished()
    n = computer.num_frames_ready
    if n == 0:
        return np.zeros((0, opts.mel_opts.num_bins), np.float32)
    return np.stack([np.asarray(computer.get_frame(i), dtype=np.float32) for i in range(n)])
