"""PNG and WAV files: read any image FFmpeg reads, write 8-bit RGB PNG (Pillow) and 16-bit PCM WAV."""

from __future__ import annotations

import os

import av
import numpy as np
import soundfile
from PIL import Image


def read_png(path: str) -> np.ndarray:
    """Any image FFmpeg reads → uint8 ``[H, W, 3]``."""
    with av.open(path) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """uint8 ``[H, W, 3]`` → 8-bit RGB PNG (Pillow's encoder).

    Raises:
        ValueError: ``rgb`` is not a uint8 ``[H, W, 3]`` array.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png expects uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    Image.fromarray(np.ascontiguousarray(rgb)).save(os.fspath(path), format="PNG")


def write_wav(path: str | os.PathLike, wave: np.ndarray, rate: int) -> None:
    """Float ``[L]`` → 16-bit PCM WAV."""
    soundfile.write(str(path), np.clip(wave, -1.0, 1.0), rate, subtype="PCM_16")
