"""Whisper log-mel and Kaldi/BEATs filterbank features against reference values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimo_ray.media.audio_features import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    fbank,
    kaldi_mel_banks,
    log_mel,
    mel_filterbank,
    num_fbank_frames,
    num_mel_frames,
)


def test_mel_filterbank_matches_slaney_reference_values() -> None:
    # (band, fft bin, weight) from librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), Whisper's filters.
    bank = mel_filterbank(16000, 400, 80)
    assert bank.shape == (80, 201)
    for band, fft_bin, weight in [(0, 1, 0.024862595), (20, 20, 0.013890394), (40, 43, 0.014735566),
                                  (79, 193, 0.0031413133)]:  # fmt: skip
        assert bank[band, fft_bin] == pytest.approx(weight, rel=1e-5)
    nonzero = [np.flatnonzero(bank[b]) for b in (0, 20, 40, 79)]
    assert [(n[0], n[-1]) for n in nonzero] == [(1, 1), (19, 20), (42, 44), (186, 199)]


def test_log_mel_matches_a_torch_stft_whisper_reference() -> None:
    wave = np.random.default_rng(0).normal(0.0, 0.2, 16000 * 2).astype(np.float32)
    stft = torch.stft(torch.from_numpy(wave), 400, 160, window=torch.hann_window(400), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(np.array(mel_filterbank(16000, 400, 80))) @ power
    ref = torch.clamp(mel, min=1e-10).log10()
    ref = (torch.maximum(ref, ref.max() - 8.0) + 4.0) / 4.0
    out = log_mel(wave)
    assert out.dtype == np.float32 and out.shape == (80, 200)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4)


def test_log_mel_frame_counts() -> None:
    assert num_mel_frames(480000) == 3000
    assert log_mel(np.zeros(480000, np.float32)).shape == (80, 3000)
    for n in (0, 159, 160, 1000, 16000):
        assert log_mel(np.ones(n, np.float32), n_mels=128).shape == (128, num_mel_frames(n, 160))


def test_log_mel_dynamic_range_is_clamped() -> None:
    wave = np.zeros(16000, np.float32)
    wave[8000] = 1.0
    out = log_mel(wave)
    assert out.max() - out.min() == pytest.approx(2.0, abs=1e-5)  # 8 decades / 4


def test_fbank_matches_kaldi_reference_values() -> None:
    n = np.arange(1200)
    wave = (0.5 * np.sin(2 * np.pi * 1000 * n / 16000) + 0.1 * np.sin(2 * np.pi * 3000 * n / 16000)).astype(
        np.float32
    )
    # Frame 2 of Kaldi's compute-fbank-feats (dither 0, low 20 Hz, high = Nyquist) on this wave * 32768.
    cases = [
        ("povey", 80, [0, 5, 20, 40, 79], [6.1177, 6.899, 11.7454, 8.0297, -0.1347]),
        ("hamming", 40, [0, 5, 10, 20, 39], [14.0853, 14.7788, 16.4462, 15.5822, 15.2819]),
    ]
    for window, n_mels, bands, expected in cases:
        raw = fbank(wave, n_mels, window=window, normalize=False)
        assert raw.shape == (n_mels, 6) and raw.dtype == np.float32
        np.testing.assert_allclose(raw[bands, 2], expected, atol=5e-3)
        normalised = fbank(wave, n_mels, window=window)
        np.testing.assert_allclose(normalised, (raw - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD), atol=1e-5)


def test_fbank_frame_counts_and_tone_peak() -> None:
    assert num_fbank_frames(399) == 0 and num_fbank_frames(400) == 1 and num_fbank_frames(16000) == 98
    assert fbank(np.zeros(100, np.float32)).shape == (128, 0)
    t = np.arange(16000) / 16000
    feats = fbank((0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert feats.shape == (128, 98)
    banks = kaldi_mel_banks(128, 512, 16000)
    assert int(np.argmax(feats.mean(axis=1))) == int(np.argmax(banks[:, 32]))  # 1 kHz is FFT bin 32 of 512
    with pytest.raises(ValueError, match="window"):
        fbank(np.zeros(1000, np.float32), window="hann")
