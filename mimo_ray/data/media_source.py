"""Checks shared by every media reader: the input exists, is not empty, and has a printable name."""

from __future__ import annotations

import io
import os

from mimo_ray.data.errors import MediaError

#: A media file given either by path or by its raw bytes (as Ray Data's ``read_binary_files`` yields them).
MediaSource = str | os.PathLike[str] | bytes | bytearray | memoryview


def describe(source: MediaSource) -> str:
    """Returns a short name for ``source`` to put in error messages (the path, or the byte count)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return os.fspath(source)


def checked_source(source: MediaSource) -> str | io.BytesIO:
    """Validates that ``source`` can be opened and returns what the decoders accept.

    Args:
        source: A filesystem path or the file's bytes.

    Returns:
        The path as ``str``, or a fresh ``io.BytesIO`` over the bytes.

    Raises:
        MediaError: stage ``"open"`` when the path does not exist, is not a regular file, or the file/bytes
            are empty.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError("open", "media bytes are empty (0 bytes)")
        return io.BytesIO(bytes(source))
    path = os.fspath(source)
    if not os.path.exists(path):
        raise MediaError("open", f"{path}: file does not exist")
    if not os.path.isfile(path):
        raise MediaError("open", f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError("open", f"{path}: file is empty (0 bytes)")
    return path
