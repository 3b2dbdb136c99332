"""Audio loading, resampling and error stages on real WAV/mp4 files."""

from __future__ import annotations

import numpy as np
import pytest

from mimo_ray.data.audio import crop_or_pad, load_audio, log_mel, mel_center_frequencies
from mimo_ray.data.errors import MediaError
from mimo_ray.data.resample import resample
from tests.unit.data.reference_resample import resample as reference_resample


def level_db(wave: np.ndarray, amplitude: float) -> float:
    """RMS of the middle half of ``wave`` relative to a sine of ``amplitude``, in dB."""
    mid = wave[wave.size // 4 : 3 * wave.size // 4]
    return 20.0 * np.log10(np.sqrt(np.mean(mid.astype(np.float64) ** 2)) / (amplitude / np.sqrt(2.0)) + 1e-20)


def peak_band(wave: np.ndarray) -> int:
    """Mel band with the most energy averaged over time."""
    return int(np.argmax(log_mel(wave).mean(axis=1)))


def nearest_band(frequency: float) -> int:
    return int(np.argmin(np.abs(mel_center_frequencies(80) - frequency)))


# ---------------------------------------------------------------- resampler


@pytest.mark.parametrize("orig_sr", [44100, 22050, 48000])
def test_resampler_keeps_passband_tones_in_level_and_phase(orig_sr: int, media) -> None:
    out = resample(media.tone(1000.0, orig_sr, 1.0), orig_sr, 16000)
    assert out.dtype == np.float32 and out.shape == (16000,)
    assert abs(level_db(out, 0.5)) < 0.05
    # Sample n of the output is the tone at time n / 16000 (no delay introduced by the filter).
    np.testing.assert_allclose(out[1000:15000], media.tone(1000.0, 16000, 1.0)[1000:15000], atol=1e-3)


@pytest.mark.parametrize("orig_sr", [44100, 22050])
def test_resampler_suppresses_tones_above_the_new_nyquist(orig_sr: int, media) -> None:
    for frequency in (8500.0, 9000.0, 10000.0):
        out = resample(media.tone(frequency, orig_sr, 1.0), orig_sr, 16000)
        assert level_db(out, 0.5) < -60.0, frequency


def test_resampler_upsamples_and_handles_edge_cases(media) -> None:
    up = resample(media.tone(440.0, 16000, 0.5), 16000, 44100)
    assert up.shape == (22050,)
    np.testing.assert_allclose(up[2000:20000], media.tone(440.0, 44100, 0.5)[2000:20000], atol=1e-3)
    assert resample(np.zeros(0, np.float32), 44100, 16000).shape == (0,)
    same = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(resample(same, 16000, 16000), same)
    with pytest.raises(ValueError, match="sample rates"):
        resample(same, 0, 16000)


@pytest.mark.parametrize("orig_sr", [44100, 22050, 48000, 8000])
def test_soxr_resampler_matches_the_former_polyphase_filter(orig_sr: int) -> None:
    # Band-limited content (tones well inside both pass bands): the two filters agree to 1e-5 away from the ends
    # (measured ≤ 5.2e-6), and to 0.02 at the ends, where each filter's own edge transient differs (measured 0.013).
    t = np.arange(orig_sr) / orig_sr
    wave = (0.5 * np.sin(2 * np.pi * 1000.0 * t) + 0.2 * np.sin(2 * np.pi * 3000.0 * t)).astype(np.float32)
    ours, before = resample(wave, orig_sr, 16000), reference_resample(wave, orig_sr, 16000)
    assert ours.shape == before.shape == (16000,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[200:-200], before[200:-200], atol=1e-5)
    np.testing.assert_allclose(ours, before, atol=0.02)
    # Odd lengths keep the ceil(N * target / orig) contract.
    assert resample(wave[:1001], orig_sr, 16000).shape == reference_resample(wave[:1001], orig_sr, 16000).shape


# ---------------------------------------------------------------- load_audio + log-mel


@pytest.mark.parametrize("frequency", [440.0, 1000.0, 2500.0])
def test_wav_tone_peaks_in_its_mel_band(frequency: float, wav_file, media) -> None:
    wave = load_audio(wav_file(media.tone(frequency, 44100, 1.0), 44100))
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert peak_band(wave) == nearest_band(frequency)


@pytest.mark.parametrize("frequency,rate", [(659.26, 44100), (1500.0, 16000)])
def test_mp4_audio_stream_tone_peaks_in_its_mel_band(
    frequency: float, rate: int, palette_clip, media
) -> None:
    path = palette_clip(8, audio=(media.tone(frequency, rate, 1.0), rate))
    wave = load_audio(path, from_video=True, expected_seconds=1.0)
    assert wave.dtype == np.float32 and abs(wave.size - 16000) < 1200  # AAC pads up to a whole frame
    assert peak_band(wave) == nearest_band(frequency)


def test_stereo_is_averaged_and_bytes_load_like_paths(wav_file, media) -> None:
    left = media.tone(440.0, 16000, 0.5)
    path = wav_file(np.stack([left, np.zeros_like(left)], axis=1), 16000)
    wave = load_audio(path)
    np.testing.assert_allclose(wave, left / 2, atol=1e-4)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), wave)


# ---------------------------------------------------------------- crop_or_pad


def test_crop_or_pad() -> None:
    wave = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(crop_or_pad(wave, 4, train=False), [0, 1, 2, 3])
    np.testing.assert_array_equal(crop_or_pad(wave, 12, train=True), np.r_[wave, 0, 0])
    crops = [crop_or_pad(wave, 4, train=True, rng=np.random.default_rng(s)) for s in (0, 0, 5)]
    np.testing.assert_array_equal(crops[0], crops[1])
    assert all(np.all(np.diff(c) == 1) for c in crops)
    assert {float(c[0]) for c in (crops[0], crops[2])} != {0.0}
    assert crop_or_pad(wave, 10, train=True) is not wave


# ---------------------------------------------------------------- error stages


def test_missing_and_empty_files_fail_at_open(tmp_path) -> None:
    for src in (tmp_path / "nope.wav", tmp_path / "nope.mp4"):
        with pytest.raises(MediaError, match="nope") as err:
            load_audio(src, from_video=src.suffix == ".mp4")
        assert err.value.stage == "open"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.wav") as err:
        load_audio(empty)
    assert err.value.stage == "open"


def test_garbage_fails_at_audio(tmp_path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match=r"garbage\.mp4") as err:
        load_audio(garbage, from_video=True)
    assert err.value.stage == "audio"
    fake_wav = tmp_path / "fake.wav"
    fake_wav.write_bytes(b"RIFF but not really a wave file" * 20)
    with pytest.raises(MediaError, match=r"fake\.wav") as err:
        load_audio(fake_wav)
    assert err.value.stage == "audio"


def test_truncated_wav_is_detected_from_its_header(wav_file, media) -> None:
    path = wav_file(media.tone(440.0, 22050, 1.0), 22050)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header still declares the full length
    with pytest.raises(
        MediaError, match=r"a\.wav: decoded \d+ audio samples but the header declares 22050"
    ) as err:
        load_audio(path)
    assert err.value.stage == "truncated"


def test_audio_shorter_than_the_video_is_truncated(wav_file, media) -> None:
    path = wav_file(media.tone(440.0, 16000, 1.0), 16000)
    assert load_audio(path, expected_seconds=1.05).shape == (16000,)
    with pytest.raises(MediaError, match="expected") as err:
        load_audio(path, expected_seconds=2.0)
    assert err.value.stage == "truncated"


def test_video_without_audio_stream_fails_at_audio(palette_clip) -> None:
    with pytest.raises(MediaError, match=r"clip\.mp4: no audio stream \(streams: video\)") as err:
        load_audio(palette_clip(4), from_video=True)
    assert err.value.stage == "audio"


# ---------------------------------------------------------------- audio beside / inside a video (sample level)


def _spec():
    from mimo_ray.config_cli import load_config
    from mimo_ray.data.sample_media import MediaSpec

    return MediaSpec.from_config(load_config("tiny"))  # 2 s clips at 16 kHz → log-mel [80, 200]


def _request(video, audio=None) -> dict:
    return {"video": str(video), "audio": str(audio) if audio else None, "train": False, "seed": [0, 0, 0]}


def test_short_wav_beside_a_longer_video_is_kept_and_zero_padded(palette_clip, wav_file, media) -> None:
    from mimo_ray.data.sample_media import audio_features, decode_media

    spec = _spec()
    video = palette_clip(32)  # 4 s at 8 fps
    speech = media.tone(700.0, 22050, 1.4)  # 1.4 s: the narration case that was quarantined as truncated
    wav = wav_file(speech, 22050)
    out = decode_media(_request(video, wav), spec)
    assert out["audio"].shape == (80, 200) and out["video"].shape == (4, 32, 32, 3)  # uint8 RGB frames
    wave = load_audio(wav)
    assert wave.shape == (22400,)  # 1.4 s at 16 kHz
    padded = np.zeros(spec.clip_samples, dtype=np.float32)
    padded[: wave.size] = wave
    np.testing.assert_allclose(out["audio"], audio_features(padded, spec), atol=1e-5)
    # Frames whose window lies wholly in the zero padding (from 1.4 s + one window) hold the silence value;
    # the frames of the speech do not.
    tail = (wave.size + spec.n_fft) // spec.hop_length + 1
    assert np.all(out["audio"][:, tail:] == out["audio"][:, tail:].min())
    assert out["audio"][:, :130].max() > out["audio"][:, tail:].max() + 1.0
    assert peak_band(padded) == nearest_band(700.0)


def test_wav_longer_than_the_video_is_kept_and_cropped(palette_clip, wav_file, media) -> None:
    from mimo_ray.data.sample_media import audio_features, decode_media

    spec = _spec()
    wav = wav_file(media.tone(440.0, 16000, 6.0), 16000)  # 6 s beside a 4 s video
    out = decode_media(_request(palette_clip(32), wav), spec)
    np.testing.assert_allclose(out["audio"], audio_features(load_audio(wav)[: spec.clip_samples], spec), atol=1e-5)
    # Training crops at a seeded random offset, still exactly one clip.
    train = decode_media({**_request(palette_clip(32), wav), "train": True, "seed": [1, 0, 3]}, spec)
    assert train["audio"].shape == (80, 200)


def test_truncated_wav_beside_a_video_is_still_quarantined(palette_clip, wav_file, media) -> None:
    from mimo_ray.data.sample_media import decode_media

    wav = wav_file(media.tone(440.0, 22050, 1.0), 22050, name="cut.wav")
    data = wav.read_bytes()
    wav.write_bytes(data[: len(data) // 3])  # the RIFF header still declares 22050 frames
    with pytest.raises(MediaError, match=r"cut\.wav: decoded \d+ audio samples but the header declares 22050") as err:
        decode_media(_request(palette_clip(32), wav), _spec())
    assert err.value.stage == "truncated"


def _write_mkv(path, seconds: float, media) -> None:
    """Matroska with interleaved H.264 (8 fps) and AAC (16 kHz) of ``seconds``; declares no mp4-style stream length."""
    from fractions import Fraction

    import av

    frames, wave = media.palette_frames(int(8 * seconds)), media.tone(440.0, 16000, seconds)
    with av.open(str(path), "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=Fraction(8))
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        pos = 0
        for k, frame in enumerate(frames):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            while pos < min(wave.size, (k + 1) * 2000):
                chunk = av.AudioFrame.from_ndarray(wave[None, pos : pos + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, pos
                container.mux(audio.encode(chunk))
                pos += 1024
        container.mux(video.encode(None))
        container.mux(audio.encode(None))


def test_muxed_audio_that_ends_early_is_still_truncated(tmp_path, media) -> None:
    from mimo_ray.data.sample_media import decode_media

    whole = tmp_path / "whole.mkv"
    _write_mkv(whole, 4.0, media)
    assert abs(load_audio(whole, from_video=True).size - 64000) < 2048
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # the segment header still says 4 s
    with pytest.raises(MediaError, match=r"cut\.mkv: decoded \d+ audio samples but the header declares 6\d{4}") as err:
        load_audio(cut, from_video=True)
    assert err.value.stage == "truncated"
    with pytest.raises(MediaError, match=r"cut\.mkv") as err:  # the frames are still there: audio is the catch
        decode_media(_request(cut), _spec())
    assert err.value.stage == "truncated"


def test_muxed_audio_track_shorter_than_its_video_is_padded(palette_clip, media) -> None:
    from mimo_ray.data.sample_media import decode_media

    video = palette_clip(32, audio=(media.tone(440.0, 16000, 1.0), 16000))  # the AAC track declares 1 s of 4 s
    out = decode_media(_request(video), _spec())
    assert out["audio"].shape == (80, 200)
    assert out["audio"][:, 120:].max() < out["audio"][:, :90].max() - 1.0  # speech, then padding
