"""PNG and WAV files: read any image FFmpeg reads, write 8-bit RGB PNG and 16-bit PCM WAV."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import soundfile


def read_png(path: str) -> np.ndarray:
    """Any image FFmpeg reads → uint8 ``[H, W, 3]``."""
    with av.open(path) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """uint8 ``[H, W, 3]`` → 8-bit RGB PNG (zlib only)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[y]).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def write_wav(path: str | os.PathLike, wave: np.ndarray, rate: int) -> None:
    """Float ``[L]`` → 16-bit PCM WAV."""
    soundfile.write(str(path), np.clip(wave, -1.0, 1.0), rate, subtype="PCM_16")
