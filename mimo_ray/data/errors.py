"""Errors raised while reading media, tagged with the pipeline stage that failed."""

from __future__ import annotations

#: Stages a :class:`MediaError` can name; the quarantine file groups bad rows by these.
MEDIA_STAGES = ("open", "decode", "frames", "audio", "truncated")


class MediaError(ValueError):
    """A media file that cannot be used for training or inference.

    Subclasses ``ValueError`` so callers that treat bad input generically still catch it; the quarantine
    writer reads ``stage`` to record where the sample failed.

    Attributes:
        stage: One of :data:`MEDIA_STAGES`: ``"open"`` (missing or empty file), ``"decode"`` (not a decodable
            video/image), ``"frames"`` (too few frames), ``"audio"`` (no or undecodable audio),
            ``"truncated"`` (decoded much less audio than the file declares).
        message: Human-readable description naming the file at fault.
    """

    def __init__(self, stage: str, message: str) -> None:
        if stage not in MEDIA_STAGES:
            raise ValueError(f"MediaError stage must be one of {MEDIA_STAGES}, got {stage!r}")
        super().__init__(message)
        self.stage = stage
        self.message = message

    def __str__(self) -> str:
        return f"[{self.stage}] {self.message}"

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Ray ships exceptions between processes by pickling; the default reduce would pass only `message`.
        return (type(self), (self.stage, self.message))
