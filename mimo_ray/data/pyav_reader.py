"""Frame-accurate random access to a video with PyAV, giving the frames decord gives.

decord (``VideoReader``) numbers a clip's frames by the presentation timestamps of its video packets: ``len`` is the
packet count, frame ``i`` is the packet with the ``i``-th smallest pts. It seeks to the keyframe at or before each
wanted frame, decodes forward and converts only the wanted frames through an FFmpeg filter graph
``scale=W:H`` (libavfilter's default ``bilinear`` flags in decord's FFmpeg 4.1) with an ``rgb24`` sink, after a
``transpose`` for a rotated stream. :class:`PyAVVideoReader` does the same with PyAV's FFmpeg, so the two agree
frame for frame and byte for byte (``tests/unit/data/test_video_backends.py`` checks H.264, MPEG-4 part 2, VP8 and
MJPEG clips, native and resized, with and without rotation).
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np

#: decord's filters before ``scale`` for a stream whose display matrix turns it by this many degrees clockwise.
_ROTATION_FILTERS = {
    90: [("transpose", "1")],
    180: [("transpose", "1"), ("transpose", "1")],
    270: [("transpose", "2")],
}


class PyAVVideoReader:
    """Opens one video and fetches frames by index, resized to ``(height, width)`` as uint8 RGB.

    Args:
        src: A path or a seekable binary file (``io.BytesIO``); a file object is rewound first.
        width: Output width in pixels.
        height: Output height in pixels.
        num_threads: Decoder threads; 1 for many parallel workers, 0 lets FFmpeg choose.

    Raises:
        ValueError: no video stream, or one whose packets carry no timestamps.
        av.FFmpegError: the container cannot be opened or demuxed.
    """

    def __init__(self, src: str | io.BufferedIOBase, width: int, height: int, num_threads: int = 1) -> None:
        import av  # deferred: loads FFmpeg's libraries

        if isinstance(src, io.IOBase):
            src.seek(0)
        self._width, self._height = int(width), int(height)
        self._container = av.open(src)
        try:
            if not self._container.streams.video:
                raise ValueError("no video stream in file")
            self._stream = self._container.streams.best("video")
            self._stream.thread_count = int(num_threads)
            self._stream.thread_type = "AUTO"  # FFmpeg's default (frame + slice), as decord leaves it
            self._pts, self._keyframes = self._index_packets()
        except BaseException:
            self._container.close()
            raise
        self._index_of_pts = {pts: i for i, pts in enumerate(self._pts)}
        self._graph = None

    def __len__(self) -> int:
        return len(self._pts)

    def __enter__(self) -> PyAVVideoReader:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the container."""
        self._container.close()

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """The frames at ``indices`` (any order, repeats allowed).

        Returns:
            uint8 ``[len(indices), height, width, 3]``.

        Raises:
            IndexError: an index outside ``[0, len(self))``.
            EOFError: the stream ends before a wanted frame is decoded.
            ValueError: a decoded frame's pts matches no packet.
        """
        wanted = sorted({int(i) for i in indices})
        if wanted and (wanted[0] < 0 or wanted[-1] >= len(self)):
            raise IndexError(f"frame indices must lie in [0, {len(self)}), got {list(indices)}")
        frames = self._decode(wanted)
        out = np.empty((len(indices), self._height, self._width, 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            out[row] = frames[int(index)]
        return out

    # ------------------------------------------------------------------ internals
    def _index_packets(self) -> tuple[list[int], list[int]]:
        """Sorted pts of the stream's packets and the sorted indices of its keyframes (one demuxing pass)."""
        pts: list[int] = []
        key_pts: list[int] = []
        for packet in self._container.demux(self._stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None:
                raise ValueError("video packets carry no timestamps; cannot number its frames")
            pts.append(int(stamp))
            if packet.is_keyframe:
                key_pts.append(int(stamp))
        pts.sort()
        index = {p: i for i, p in enumerate(pts)}
        keyframes = sorted(index[p] for p in key_pts) or [0]
        return pts, keyframes

    def _seek(self, pts: int) -> None:
        self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)

    def _keyframe_at_or_before(self, index: int) -> int:
        position = bisect.bisect_right(self._keyframes, index) - 1
        return self._keyframes[max(position, 0)]

    def _decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decodes forward from keyframes, converting the wanted frames only."""
        todo = set(wanted)
        out: dict[int, np.ndarray] = {}
        run: Iterator | None = None
        position = -1  # index of the last frame the current decoding run produced
        for target in wanted:
            if target in out:
                continue
            key = self._keyframe_at_or_before(target)
            if run is None or key > position + 1 or target <= position:
                self._seek(self._pts[key])
                run = self._container.decode(self._stream)
                position = key - 1
            for frame in run:
                index = self._frame_index(frame)
                if index in todo and index not in out:
                    out[index] = self._to_rgb(frame)
                position = max(position, index)
                if index >= target:
                    break
            if target not in out:
                if position >= target:
                    raise ValueError(f"the decoder returned no picture for frame {target} of {len(self)}")
                raise EOFError(f"stream ended after frame {position} of {len(self)}, before frame {target}")
        return out

    def _frame_index(self, frame: object) -> int:
        stamp = frame.pts
        if stamp not in self._index_of_pts:
            raise ValueError(f"decoded frame has pts {stamp}, which no packet of the stream carries")
        return self._index_of_pts[stamp]

    def _to_rgb(self, frame: object) -> np.ndarray:
        if self._graph is None:
            self._graph = self._build_graph(frame)
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()

    def _build_graph(self, frame: object) -> object:
        """``[transpose,]scale=W:H:flags=bilinear,format=rgb24`` for frames shaped like ``frame``."""
        import av

        graph = av.filter.Graph()
        chain = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                  time_base=self._stream.time_base)]  # fmt: skip
        filters = [*_rotation_filters(frame), ("scale", f"{self._width}:{self._height}:flags=bilinear")]
        for name, args in [*filters, ("format", "rgb24")]:
            chain.append(graph.add(name, args))
        chain.append(graph.add("buffersink"))
        for upstream, downstream in zip(chain, chain[1:], strict=False):
            upstream.link_to(downstream)
        graph.configure()
        return graph


def _rotation_filters(frame: object) -> list[tuple[str, str]]:
    """The ``transpose`` filters decord applies for the frame's display matrix (none: upright or odd angle)."""
    counter_clockwise = getattr(frame, "rotation", 0) or 0  # PyAV: av_display_rotation_get, counter-clockwise
    return _ROTATION_FILTERS.get(int(round(-counter_clockwise)) % 360, [])
