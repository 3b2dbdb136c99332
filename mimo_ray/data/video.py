"""Video and image decoding into uint8 RGB frames (the vision encoder normalises them on its device)."""

from __future__ import annotations

import io

import numpy as np

from mimo_ray.data.errors import MediaError
from mimo_ray.data.media_source import MediaSource, checked_source, describe
from mimo_ray.data.video_backend import resolve_video_backend
from mimo_ray.data.video_readers import open_video_reader
from mimo_ray.media.geometry import ASPECT_MODES, fit_picture, same_aspect


def sample_frame_indices(
    num_total: int, num_frames: int, *, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Chooses ``num_frames`` frame indices spread over a clip of ``num_total`` frames.

    The clip is cut into ``num_frames`` equal segments. For evaluation the centre of each segment is taken;
    for training one frame is drawn uniformly inside each segment (temporal jitter as augmentation). Indices
    are strictly increasing, so the decoder can fetch them with one forward pass.

    Args:
        num_total: Number of frames in the clip.
        num_frames: Number of frames wanted.
        train: Whether to jitter inside segments.
        rng: Generator for the jitter. ``None`` in training draws fresh OS entropy (not reproducible); pass a
            seeded generator when runs must be resumable bit-for-bit.

    Returns:
        int64 array ``[num_frames]`` of sorted, distinct indices in ``[0, num_total)``.

    Raises:
        ValueError: ``num_frames`` < 1, or the clip has fewer frames than needed.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_total < num_frames:
        raise ValueError(f"clip has {num_total} frames but {num_frames} are needed")
    segment = num_total / num_frames
    if not train:
        # Consecutive centres are `segment` >= 1 apart, so their floors are strictly increasing.
        return np.floor((np.arange(num_frames) + 0.5) * segment).astype(np.int64)
    if rng is None:
        rng = np.random.default_rng()
    # Integer segment bounds keep segments disjoint and non-empty, which keeps the draws distinct.
    bounds = np.floor(np.arange(num_frames + 1) * segment).astype(np.int64)
    return rng.integers(bounds[:-1], bounds[1:]).astype(np.int64)


def decode_video(
    source: MediaSource,
    num_frames: int,
    size: tuple[int, int],
    *,
    train: bool = False,
    rng: np.random.Generator | None = None,
    num_threads: int = 1,
    aspect: str = "stretch",
    backend: str | None = None,
) -> np.ndarray:
    """Decodes ``num_frames`` frames of a video, fitted to ``size`` by ``aspect``.

    Frames are picked with :func:`sample_frame_indices` and fetched with a single sorted ``get_batch`` call, by decord
    or PyAV (:mod:`mimo_ray.data.video_backend`; both give the same frames). A clip that already has the target's
    aspect ratio (or ``aspect="stretch"``) is resized by the decoder; otherwise frames are decoded at their native
    size and padded or cropped (:func:`mimo_ray.media.geometry.fit_picture`).

    Args:
        source: Path to the video file, or its bytes.
        num_frames: Frames to return.
        size: Output ``(height, width)`` in pixels.
        train: Jitter frame choice (see :func:`sample_frame_indices`).
        rng: Generator for the jitter.
        num_threads: Decoder threads; 1 suits many parallel decode workers, 0 lets FFmpeg choose.
        aspect: ``pad`` (mean-colour pad to the target ratio, then resize), ``crop`` (resize the short side, centre
            crop) or ``stretch`` (``data.image_aspect``).
        backend: ``auto``, ``decord`` or ``pyav``; ``None`` reads ``MIMO_VIDEO_BACKEND`` (default ``auto``: decord
            where it imports, else PyAV).

    Returns:
        uint8 RGB ``[num_frames, H, W, 3]``.

    Raises:
        MediaError: stage ``"open"`` (missing or empty), ``"decode"`` (not a decodable video), ``"frames"``
            (fewer frames than ``num_frames``).
        ValueError: an unknown ``backend`` or ``aspect``.
        RuntimeError: ``backend`` ``decord`` where decord does not import.
    """
    out_size = _checked_size(size)
    height, width = out_size
    name = describe(source)
    src = checked_source(source)
    if aspect not in ASPECT_MODES:
        raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    decoder = resolve_video_backend(backend)  # a bad name or a missing forced decord is no fault of the file
    native = _native_size(src) if aspect != "stretch" else None
    if native is not None and not same_aspect(*native, out_size):
        height, width = native  # decode at the native size; fitted below
    try:
        reader = open_video_reader(src, width, height, backend=decoder, num_threads=num_threads)
        num_total = len(reader)
    except Exception as exc:  # decord raises bare RuntimeError/DECORDError, PyAV FFmpegError/ValueError
        raise MediaError("decode", f"{name}: cannot decode as video: {_first_line(exc)}") from exc
    try:
        try:
            indices = sample_frame_indices(num_total, num_frames, train=train, rng=rng)
        except ValueError as exc:
            raise MediaError("frames", f"{name}: {exc}") from exc
        try:
            frames = reader.get_batch(indices.tolist())
        except Exception as exc:
            raise MediaError(
                "decode", f"{name}: decoding frames {indices.tolist()} failed: {_first_line(exc)}"
            ) from exc
    finally:
        reader.close()
    if frames.shape != (num_frames, height, width, 3):
        raise MediaError("decode", f"{name}: decoder returned frames of shape {frames.shape}")
    if (height, width) != out_size:
        frames = np.stack([fit_picture(frame, out_size, aspect) for frame in frames])
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _native_size(src: str | io.BytesIO) -> tuple[int, int] | None:
    """``(height, width)`` of the first video stream from the container header (PyAV), or None if unknown.

    An unreadable file returns None: the decoder then reports it with its usual stage.
    """
    import av

    try:
        with av.open(src) as container:
            stream = container.streams.video[0] if container.streams.video else None
            if stream is None or not stream.width or not stream.height:
                return None
            return int(stream.height), int(stream.width)
    except Exception:  # the decoder below names the failure with its stage
        return None
    finally:
        if isinstance(src, io.BytesIO):
            src.seek(0)


def decode_image(source: MediaSource, size: tuple[int, int], aspect: str = "stretch") -> np.ndarray:
    """Decodes a still image (PNG, JPEG, ... anything FFmpeg reads), fitted to ``size`` by ``aspect``.

    Args:
        source: Path to the image file, or its bytes.
        size: Output ``(height, width)`` in pixels.
        aspect: ``pad``, ``crop`` or ``stretch`` (see :func:`decode_video`); an image of the target's ratio is
            resized by FFmpeg whatever the mode.

    Returns:
        uint8 RGB ``[1, H, W, 3]``.

    Raises:
        MediaError: stage ``"open"`` (missing or empty) or ``"decode"`` (not a decodable image).
    """
    import av  # deferred: loads FFmpeg's libraries

    height, width = _checked_size(size)
    if aspect not in ASPECT_MODES:
        raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    name = describe(source)
    src = checked_source(source)
    try:
        with av.open(src) as container:
            if not container.streams.video:
                raise MediaError("decode", f"{name}: no image stream in file")
            frame = next(container.decode(video=0), None)
            if frame is None:
                raise MediaError("decode", f"{name}: image stream holds no picture")
            if aspect == "stretch" or same_aspect(frame.height, frame.width, (height, width)):
                rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
            else:
                rgb = fit_picture(frame.to_ndarray(format="rgb24"), (height, width), aspect)
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises FFmpegError subclasses, but also OSError/ValueError on odd input
        raise MediaError("decode", f"{name}: cannot decode as image: {_first_line(exc)}") from exc
    return np.ascontiguousarray(rgb[None], dtype=np.uint8)


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validates a ``(height, width)`` pair."""
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _first_line(exc: BaseException) -> str:
    """First line of an exception message; decord appends multi-line C++ stack traces."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
