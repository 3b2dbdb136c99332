"""Audio loading (files or a video's audio stream) to mono float at a target rate, plus feature front ends."""

from __future__ import annotations

import io
import os

import numpy as np

from mimo_ray.data.errors import MediaError
from mimo_ray.data.media_source import MediaSource, checked_source, describe
from mimo_ray.data.resample import resample
from mimo_ray.media.audio_features import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    fbank,
    log_mel,
    mel_center_frequencies,
    mel_filterbank,
    num_fbank_frames,
    num_mel_frames,
)

__all__ = [
    "BEATS_FBANK_MEAN",
    "BEATS_FBANK_STD",
    "crop_or_pad",
    "fbank",
    "load_audio",
    "log_mel",
    "mel_center_frequencies",
    "mel_filterbank",
    "num_fbank_frames",
    "num_mel_frames",
    "resample",
]

#: Extensions libsndfile reads directly; anything else (mp4, m4a, mkv, webm, ...) goes through FFmpeg (PyAV).
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".w64"})

#: Decoding less than this fraction of the declared length means the file was cut short.
MIN_DECODED_FRACTION = 0.9


def load_audio(
    source: MediaSource,
    *,
    target_sr: int = 16000,
    from_video: bool = False,
    expected_seconds: float | None = None,
) -> np.ndarray:
    """Decodes an audio file, or the first audio stream of a video, to mono float32 at ``target_sr``.

    WAV/FLAC/OGG/MP3 are read with soundfile (PyAV as fallback, e.g. for MP3 on an old libsndfile); containers
    (and everything when ``from_video``) with PyAV. Channels are averaged. The signal is resampled with a
    band-limited polyphase filter (:func:`mimo_ray.data.resample.resample`).

    Args:
        source: Path to the file, or its bytes (bytes are tried with soundfile first unless ``from_video``).
        target_sr: Output sample rate in Hz.
        from_video: The source is a video container; take its first audio stream.
        expected_seconds: Extra duration the audio itself must have (decoding less than 90 % of it is reported as
            truncation). Not the video's duration: a separate audio track shorter or longer than its video is
            valid and is padded or cropped to the clip length later (:func:`crop_or_pad`).

    Returns:
        float32 ``[num_samples]`` at ``target_sr``.

    Raises:
        MediaError: stage ``"open"`` (missing or empty file), ``"audio"`` (no audio stream, undecodable, or
            no samples), ``"truncated"`` (decoded < 90 % of the length the source itself declares: a WAV's RIFF
            header, libsndfile's frame count, or for PyAV the stream's duration, its ``DURATION`` tag or the
            container's duration; or of ``expected_seconds``).
    """
    name = describe(source)
    src = checked_source(source)
    if from_video or not _soundfile_readable(src):
        wave, sr, declared = _decode_with_av(src, name)
    else:
        try:
            wave, sr, declared = _decode_with_soundfile(src)
        except Exception as sf_exc:  # libsndfile's errors are not typed by cause; let FFmpeg try the file
            if isinstance(src, io.BytesIO):
                src.seek(0)
            try:
                wave, sr, declared = _decode_with_av(src, name)
            except MediaError as av_exc:
                raise MediaError(av_exc.stage, f"{av_exc.message} (soundfile: {sf_exc})") from av_exc
    if wave.size == 0:
        raise MediaError("audio", f"{name}: audio stream decoded to 0 samples")
    if declared is not None and wave.size < MIN_DECODED_FRACTION * declared:
        raise MediaError(
            "truncated", f"{name}: decoded {wave.size} audio samples but the header declares {declared}"
        )
    if expected_seconds is not None and wave.size / sr < MIN_DECODED_FRACTION * expected_seconds:
        raise MediaError(
            "truncated",
            f"{name}: decoded {wave.size / sr:.3f} s of audio but {expected_seconds:.3f} s were expected",
        )
    return resample(wave, sr, target_sr)


def crop_or_pad(
    wave: np.ndarray, num_samples: int, *, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Fits a signal to exactly ``num_samples`` samples.

    Longer signals are cropped: from the start for evaluation (Whisper's convention), at a random offset for
    training. Shorter ones are zero-padded at the end.

    Args:
        wave: float ``[N]``.
        num_samples: Output length.
        train: Crop at a random offset.
        rng: Generator for the offset; ``None`` in training draws fresh OS entropy.

    Returns:
        float32 ``[num_samples]`` (a new array).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"crop_or_pad expects a mono [N] signal, got shape {wave.shape}")
    if wave.size >= num_samples:
        start = 0
        if train and wave.size > num_samples:
            start = int(
                (rng if rng is not None else np.random.default_rng()).integers(0, wave.size - num_samples + 1)
            )
        return wave[start : start + num_samples].copy()
    out = np.zeros(num_samples, dtype=np.float32)
    out[: wave.size] = wave
    return out


def _soundfile_readable(src: str | io.BytesIO) -> bool:
    """Whether to try libsndfile first: known audio extensions, or in-memory bytes."""
    if isinstance(src, io.BytesIO):
        return True
    return os.path.splitext(src)[1].lower() in SOUNDFILE_EXTENSIONS


def _decode_with_soundfile(src: str | io.BytesIO) -> tuple[np.ndarray, int, int | None]:
    """Reads with libsndfile.

    Returns:
        (float32 ``[N]`` mono at the file's rate, the rate, declared frame count or ``None``).
    """
    import soundfile

    with soundfile.SoundFile(src) as f:
        sr = int(f.samplerate)
        declared: int | None = int(f.frames)
        data = f.read(dtype="float32", always_2d=True)
    # libsndfile silently shortens a WAV's declared length to what the file holds; the RIFF header keeps it.
    wav_declared = _wav_declared_frames(_head_bytes(src))
    if wav_declared is not None:
        declared = wav_declared
    return data.mean(axis=1, dtype=np.float32), sr, declared


def _decode_with_av(src: str | io.BytesIO, name: str) -> tuple[np.ndarray, int, int | None]:
    """Decodes the first audio stream with FFmpeg (PyAV).

    Returns:
        (float32 ``[N]`` mono at the stream's rate, the rate, samples the file declares for the stream
        (:func:`_declared_seconds`) or ``None``).
    """
    import av

    if isinstance(src, io.BytesIO):
        src.seek(0)
    try:
        container = av.open(src)
    except Exception as exc:  # FFmpegError subclasses, plus OSError for unreadable files
        raise MediaError("audio", f"{name}: cannot open as audio/video container: {exc}") from exc
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise MediaError("audio", f"{name}: no audio stream (streams: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        sr = int(stream.codec_context.sample_rate or stream.rate or 0)
        if sr <= 0:
            raise MediaError("audio", f"{name}: audio stream has no sample rate")
        seconds = _declared_seconds(container, stream)
        declared = int(seconds * sr) if seconds is not None else None
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                chunks.append(_frame_to_mono(frame))
        except Exception as exc:
            raise MediaError("audio", f"{name}: audio decoding failed: {exc}") from exc
    wave = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return wave, sr, declared


def _declared_seconds(container: object, stream: object) -> float | None:
    """Length the file declares for an audio stream, in seconds (``None`` when it declares none).

    In order: the stream's own duration (mp4/m4a ``mdhd``), its ``DURATION`` tag (Matroska/WebM write one per
    stream), then the container's duration (e.g. a Matroska segment header) for files that declare no stream length.
    """
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            hours, minutes, secs = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(secs)
        except ValueError:
            pass  # an unparsable tag: fall back to the container
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _frame_to_mono(frame: object) -> np.ndarray:
    """Converts one PyAV ``AudioFrame`` to float32 mono ``[samples]`` by averaging channels."""
    data = frame.to_ndarray()  # planar: [C, n]; packed: [1, n*C] interleaved
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / np.float32(-np.iinfo(data.dtype).min)
    return data.astype(np.float32).mean(axis=0)


def _head_bytes(src: str | io.BytesIO, limit: int = 1 << 16) -> bytes:
    """First ``limit`` bytes of the file (enough for the chunks before a WAV's ``data`` chunk)."""
    if isinstance(src, io.BytesIO):
        return src.getbuffer()[:limit].tobytes()
    with open(src, "rb") as f:
        return f.read(limit)


def _wav_declared_frames(head: bytes) -> int | None:
    """Frame count a RIFF/WAVE header declares in its ``data`` chunk, or ``None`` if unknown/not a WAV."""
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX"):
        return None
    order = "little" if head[:4] == b"RIFF" else "big"
    block_align = None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], order)
        if chunk_id == b"fmt " and pos + 22 <= len(head):
            block_align = int.from_bytes(head[pos + 20 : pos + 22], order)
        elif chunk_id == b"data":
            # 0 and 0xFFFFFFFF mark streamed WAVs whose length was never filled in.
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None
