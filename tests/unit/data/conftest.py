"""Fixtures that write small real media files (H.264 mp4, WAV, PNG) for the data tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile

REPO_ROOT = Path(__file__).resolve().parents[3]

#: 16 well-separated colours (corners and edge midpoints of the RGB cube), one per frame in the index tests.
PALETTE = np.array(
    [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
        [255, 0, 255], [0, 255, 255], [255, 255, 255], [0, 0, 0],
        [128, 0, 0], [0, 128, 0], [0, 0, 128], [128, 128, 0],
        [128, 0, 128], [0, 128, 128], [128, 128, 128], [255, 128, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    """A sine ``[round(rate * seconds)]`` float32."""
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2.0 * np.pi * frequency * t)).astype(np.float32)


def write_mp4(
    path: Path,
    frames: np.ndarray,
    fps: int = 8,
    audio: tuple[np.ndarray, int] | None = None,
) -> Path:
    """Encodes uint8 ``[T, H, W, 3]`` frames as H.264 (plus an AAC track from ``(wave [N], rate)``)."""
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "veryfast", "crf": "12", "threads": "1"}
        stream = None
        if audio is not None:
            stream = container.add_stream("aac", rate=audio[1])
            stream.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if stream is not None:
            wave, rate = audio
            for start in range(0, wave.size, 1024):
                frame = av.AudioFrame.from_ndarray(
                    wave[None, start : start + 1024], format="fltp", layout="mono"
                )
                frame.sample_rate = rate
                frame.pts = start
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    return path


def palette_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frames whose frame ``k`` is filled with ``PALETTE[k % 16]``: uint8 ``[num_frames, H, W, 3]``."""
    colours = PALETTE[np.arange(num_frames) % len(PALETTE)]
    return np.broadcast_to(colours[:, None, None, :], (num_frames, height, width, 3)).copy()


def nearest_palette_index(rgb: np.ndarray) -> int:
    """Index of the palette colour closest to an RGB triple."""
    return int(np.argmin(((PALETTE.astype(np.float64) - rgb) ** 2).sum(axis=1)))


@pytest.fixture(scope="session")
def media() -> SimpleNamespace:
    """Helpers for building and checking test media: ``tone``, ``write_mp4``, ``palette_frames``,
    ``nearest_palette_index`` and ``PALETTE``."""
    return SimpleNamespace(
        tone=tone,
        write_mp4=write_mp4,
        palette_frames=palette_frames,
        nearest_palette_index=nearest_palette_index,
        PALETTE=PALETTE,
    )


@pytest.fixture
def palette_clip(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``palette_clip(num_frames, name="clip.mp4", audio=None)`` → mp4 path of palette frames."""

    def make(num_frames: int, name: str = "clip.mp4", audio: tuple[np.ndarray, int] | None = None) -> Path:
        return write_mp4(tmp_path / name, palette_frames(num_frames), audio=audio)

    return make


@pytest.fixture
def wav_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``wav_file(wave, rate, name="a.wav")`` → path of a 16-bit PCM WAV."""

    def make(wave: np.ndarray | Sequence[float], rate: int, name: str = "a.wav") -> Path:
        path = tmp_path / name
        soundfile.write(str(path), np.asarray(wave, dtype=np.float32), rate, subtype="PCM_16")
        return path

    return make


@pytest.fixture
def png_file(tmp_path: Path) -> Callable[[np.ndarray], Path]:
    """Factory: ``png_file(rgb uint8 [H, W, 3])`` → path of a PNG written with PyAV."""

    def make(rgb: np.ndarray) -> Path:
        path = tmp_path / "image.png"
        with av.open(str(path), "w", format="image2") as container:
            stream = container.add_stream("png")
            stream.width, stream.height = rgb.shape[1], rgb.shape[0]
            stream.pix_fmt = "rgb24"
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode(None))
        return path

    return make


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Repository root, for running scripts."""
    return os.fspath(REPO_ROOT)
