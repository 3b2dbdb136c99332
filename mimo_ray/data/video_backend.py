"""Which library decodes videos: decord where it is installed, PyAV elsewhere, or whichever is forced.

decord 0.6.0 ships wheels for x86_64 only (``pyproject.toml`` installs it there); on other machines (aarch64)
:class:`mimo_ray.data.pyav_reader.PyAVVideoReader` stands in and returns the same frames (same indices, same RGB
bytes: both run FFmpeg's decoder and the same bilinear ``scale`` filter). ``MIMO_VIDEO_BACKEND`` forces one:

- ``auto`` (default): decord if it imports, else PyAV;
- ``decord``: decord, or an error where it does not import;
- ``pyav``: PyAV even where decord is installed.

The variable is read in the process that decodes (the Ray Data decode workers inherit the driver's environment on a
local cluster; on a remote one pass it in the job's ``runtime_env``).
"""

from __future__ import annotations

import os
from types import ModuleType

#: Environment variable that picks the video decoder.
VIDEO_BACKEND_ENV = "MIMO_VIDEO_BACKEND"

#: Values it accepts.
VIDEO_BACKENDS = ("auto", "decord", "pyav")


def import_decord() -> ModuleType:
    """Imports ``decord`` (deferred: it loads FFmpeg's libraries).

    Raises:
        RuntimeError: decord does not import here (it has no wheel for aarch64).
    """
    try:
        import decord
    except (ImportError, OSError) as exc:  # OSError: a wheel whose bundled FFmpeg libraries fail to load
        raise RuntimeError(
            f"decord does not import here ({type(exc).__name__}: {exc}); it has wheels for x86_64 only"
        ) from exc
    return decord


def decord_available() -> bool:
    """Whether ``decord`` imports here."""
    try:
        import_decord()
    except RuntimeError:
        return False
    return True


def resolve_video_backend(requested: str | None = None) -> str:
    """The decoder to use: ``"decord"`` or ``"pyav"``.

    Args:
        requested: ``auto``, ``decord`` or ``pyav``; ``None`` reads ``MIMO_VIDEO_BACKEND`` (unset or empty:
            ``auto``).

    Returns:
        ``"decord"`` or ``"pyav"``.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: ``decord`` asked for where it does not import.
    """
    if requested is None:
        requested = os.environ.get(VIDEO_BACKEND_ENV, "")
    name = requested.strip().lower() or "auto"
    if name not in VIDEO_BACKENDS:
        raise ValueError(f"video backend ({VIDEO_BACKEND_ENV}) must be one of {VIDEO_BACKENDS}, got {requested!r}")
    if name == "auto":
        return "decord" if decord_available() else "pyav"
    if name == "decord" and not decord_available():
        raise RuntimeError(
            f"video backend 'decord' was asked for ({VIDEO_BACKEND_ENV}=decord) but decord does not import here "
            "(it has wheels for x86_64 only): set it to auto or pyav"
        )
    return name
