"""One interface over the two video decoders: ``len(reader)`` frames, ``reader.get_batch(indices)`` → uint8 RGB."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mimo_ray.data.pyav_reader import PyAVVideoReader
from mimo_ray.data.video_backend import import_decord

# Message of decord's failed buffer copy for frame widths whose row stride it gets wrong.
_DECORD_STRIDE_BUG = "DECORDArrayCopyFromTo"


class VideoReader(Protocol):
    """What :func:`mimo_ray.data.video.decode_video` needs of a decoder."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: Sequence[int]) -> np.ndarray: ...

    def close(self) -> None: ...


class DecordVideoReader:
    """decord's ``VideoReader`` returning numpy arrays, with PyAV for the frame widths decord cannot copy out.

    Args:
        src: A path or an ``io.BytesIO``.
        width: Output width in pixels.
        height: Output height in pixels.
        num_threads: Decoder threads; 0 lets FFmpeg choose.
    """

    def __init__(self, src: str | io.BytesIO, width: int, height: int, num_threads: int = 1) -> None:
        decord = import_decord()
        self._src, self._size, self._threads = src, (int(width), int(height)), num_threads
        self._reader = decord.VideoReader(src, width=width, height=height, num_threads=num_threads)

    def __len__(self) -> int:
        return len(self._reader)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        try:
            return self._reader.get_batch(list(indices)).asnumpy()
        except Exception as exc:  # decord raises bare RuntimeError/DECORDError for every failure
            if _DECORD_STRIDE_BUG not in str(exc):
                raise
        # decord 0.6 cannot copy out frames of some widths (1-4, 6, 8, 12, 16, 24, 48, 72 px, resized or
        # native); PyAV gives the same frames for any width.
        with PyAVVideoReader(self._src, *self._size, num_threads=self._threads) as reader:
            return reader.get_batch(indices)

    def close(self) -> None:
        """Nothing to release (decord frees its reader with the object)."""


def open_video_reader(
    src: str | io.BytesIO, width: int, height: int, *, backend: str, num_threads: int = 1
) -> VideoReader:
    """Opens ``src`` with the named decoder, resizing frames to ``(height, width)``.

    Args:
        src: A path or an ``io.BytesIO``.
        width: Output width in pixels.
        height: Output height in pixels.
        backend: ``"decord"`` or ``"pyav"`` (:func:`mimo_ray.data.video_backend.resolve_video_backend`).
        num_threads: Decoder threads; 0 lets FFmpeg choose.

    Returns:
        A :class:`VideoReader`.

    Raises:
        ValueError: an unknown backend.
        Exception: whatever the decoder raises for a file it cannot open.
    """
    if backend == "decord":
        return DecordVideoReader(src, width, height, num_threads)
    if backend == "pyav":
        return PyAVVideoReader(src, width, height, num_threads)
    raise ValueError(f"unknown video backend {backend!r}")
