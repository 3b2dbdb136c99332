"""Spectral features for the audio encoders: Whisper log-mel and Kaldi/BEATs filterbanks, in numpy."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

#: Dataset statistics BEATs normalises its Kaldi filterbanks with (of int16-scaled 16 kHz audio).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582

_KALDI_PREEMPHASIS = 0.97
_KALDI_LOW_FREQ = 20.0
# Kaldi floors energies at float32 machine epsilon before the log.
_KALDI_ENERGY_FLOOR = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- Whisper-style log-mel


def hz_to_mel_slaney(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (Auditory Toolbox): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log, linear)


def mel_to_hz_slaney(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel_slaney`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    linear = mel * f_sp
    log = min_log_hz * np.exp(logstep * (np.maximum(mel, min_log_mel) - min_log_mel))
    return np.where(mel >= min_log_mel, log, linear)


def mel_center_frequencies(
    n_mels: int, sr: int = 16000, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Centre frequency in Hz of each band of :func:`mel_filterbank`: float64 ``[n_mels]``."""
    fmax = sr / 2.0 if fmax is None else fmax
    points = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    return points[1:-1]


@lru_cache(maxsize=8)
def mel_filterbank(
    sr: int = 16000, n_fft: int = 400, n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Slaney-style triangular mel filterbank with area normalisation (the one Whisper was trained with).

    Args:
        sr: Sample rate in Hz.
        n_fft: FFT size; the filters act on its ``n_fft // 2 + 1`` bins.
        n_mels: Number of mel bands.
        fmin: Lowest band edge in Hz.
        fmax: Highest band edge in Hz (default ``sr / 2``).

    Returns:
        float32 ``[n_mels, n_fft // 2 + 1]``; read-only (cached and shared).
    """
    fmax = sr / 2.0 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    widths = np.diff(edges)
    rel = edges[:, None] - fft_freqs[None, :]
    rising = -rel[:-2] / widths[:-1, None]
    falling = rel[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: each triangle has unit area in Hz, so wide high bands do not dominate.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    out = weights.astype(np.float32)
    out.flags.writeable = False
    return out


def num_mel_frames(num_samples: int, hop: int = 160) -> int:
    """Number of frames :func:`log_mel` returns for ``num_samples`` samples (480000 → 3000 at hop 160)."""
    return int(num_samples) // int(hop)


def log_mel(
    wave: np.ndarray, n_mels: int = 80, n_fft: int = 400, hop: int = 160, sr: int = 16000
) -> np.ndarray:
    """Whisper's log-mel spectrogram.

    Periodic Hann window, centred frames (reflect padding), power spectrum, Slaney mel filterbank,
    ``log10(max(x, 1e-10))``, clamped to 8 decades below the clip's maximum, then ``(x + 4) / 4``. Like
    Whisper the last centred frame is dropped, so 30 s at 16 kHz gives exactly 3000 frames.

    Args:
        wave: float ``[N]`` mono signal at ``sr``, roughly in [-1, 1].
        n_mels: Mel bands.
        n_fft: FFT size and window length in samples.
        hop: Frame shift in samples.
        sr: Sample rate in Hz.

    Returns:
        float32 ``[n_mels, num_mel_frames(N, hop)]``.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a mono [N] signal, got shape {wave.shape}")
    num_frames = num_mel_frames(wave.size, hop)
    if num_frames == 0:
        return np.zeros((n_mels, 0), dtype=np.float32)
    pad = n_fft // 2
    # Reflection needs more samples than the pad; very short clips fall back to zero padding.
    mode = "reflect" if wave.size > pad else "constant"
    padded = np.pad(wave, pad, mode=mode)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:num_frames]
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    spectrum = np.fft.rfft(frames * window, axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel = mel_filterbank(sr, n_fft, n_mels) @ power.T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# ---------------------------------------------------------------- Kaldi-style filterbank (BEATs)


def _kaldi_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK/Kaldi mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=8)
def kaldi_mel_banks(n_mels: int, n_fft: int, sr: int, low_freq: float = _KALDI_LOW_FREQ) -> np.ndarray:
    """Kaldi's mel filterbank: triangles in the mel domain, unnormalised, Nyquist bin unused.

    Like torchaudio (which BEATs uses) and unlike Kaldi's binary, narrow low bands that cover no FFT bin are
    allowed: with 128 bands at 16 kHz one band is all zeros and its log energy is the constant floor.

    Returns:
        float32 ``[n_mels, n_fft // 2 + 1]``; read-only (cached and shared).
    """
    nyquist = sr / 2.0
    mel_low, mel_high = _kaldi_mel(low_freq), _kaldi_mel(nyquist)
    delta = (mel_high - mel_low) / (n_mels + 1)
    left = mel_low + np.arange(n_mels)[:, None] * delta
    centre, right = left + delta, left + 2.0 * delta
    bin_mel = _kaldi_mel(np.arange(n_fft // 2) * (sr / n_fft))[None, :]
    banks = np.maximum(
        0.0, np.minimum((bin_mel - left) / (centre - left), (right - bin_mel) / (right - centre))
    )
    out = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    out[:, :-1] = banks
    out.flags.writeable = False
    return out


def _frame_params(sr: int, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int]:
    """Window and shift in samples, as Kaldi rounds them."""
    return int(sr * frame_length_ms * 0.001), int(sr * frame_shift_ms * 0.001)


def num_fbank_frames(
    num_samples: int, sr: int = 16000, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0
) -> int:
    """Number of frames :func:`fbank` returns (Kaldi ``snip_edges``: only whole windows)."""
    window, shift = _frame_params(sr, frame_length_ms, frame_shift_ms)
    if num_samples < window:
        return 0
    return 1 + (int(num_samples) - window) // shift


def fbank(
    wave: np.ndarray,
    n_mels: int = 128,
    *,
    sr: int = 16000,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window: Literal["povey", "hamming"] = "povey",
    normalize: bool = True,
) -> np.ndarray:
    """Kaldi ``compute-fbank-feats`` log mel filterbank, as BEATs computes its inputs.

    The signal is scaled to int16 range (BEATs' statistics assume it). Per frame: remove DC, pre-emphasis
    0.97, window, zero-pad to a power of two, power spectrum, Kaldi mel banks from 20 Hz to Nyquist,
    ``log(max(x, eps))``. No dither, so the result is deterministic.

    Args:
        wave: float ``[N]`` mono signal at ``sr`` in [-1, 1].
        n_mels: Mel bands.
        sr: Sample rate in Hz.
        frame_length_ms: Window length (25 ms → 400 samples at 16 kHz).
        frame_shift_ms: Frame shift (10 ms → 160 samples).
        window: ``"povey"`` (Hann to the power 0.85, Kaldi's default) or ``"hamming"``.
        normalize: Apply BEATs' ``(x - 15.41663) / (2 * 6.55582)``.

    Returns:
        float32 ``[n_mels, num_fbank_frames(N)]``.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"fbank expects a mono [N] signal, got shape {wave.shape}")
    if window not in ("povey", "hamming"):
        raise ValueError(f"fbank window must be 'povey' or 'hamming', got {window!r}")
    win_len, shift = _frame_params(sr, frame_length_ms, frame_shift_ms)
    num_frames = num_fbank_frames(wave.size, sr, frame_length_ms, frame_shift_ms)
    if num_frames == 0:
        return np.zeros((n_mels, 0), dtype=np.float32)
    scaled = wave.astype(np.float64) * 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(scaled, win_len)[::shift][:num_frames]
    frames = frames - frames.mean(axis=1, keepdims=True)
    # Kaldi pre-emphasis treats the sample before the frame as a copy of its first sample.
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - _KALDI_PREEMPHASIS * previous
    frames = frames * _kaldi_window(window, win_len)
    n_fft = 1 << (win_len - 1).bit_length()
    spectrum = np.fft.rfft(frames, n=n_fft, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    energies = power @ kaldi_mel_banks(n_mels, n_fft, sr).T.astype(np.float64)
    feats = np.log(np.maximum(energies, _KALDI_ENERGY_FLOOR)).T
    if normalize:
        feats = (feats - BEATS_FBANK_MEAN) / (2.0 * BEATS_FBANK_STD)
    return np.ascontiguousarray(feats, dtype=np.float32)


def _kaldi_window(kind: str, length: int) -> np.ndarray:
    """Kaldi's symmetric analysis windows: float64 ``[length]``."""
    phase = 2.0 * np.pi * np.arange(length) / (length - 1)
    if kind == "povey":
        return (0.5 - 0.5 * np.cos(phase)) ** 0.85
    return 0.54 - 0.46 * np.cos(phase)
