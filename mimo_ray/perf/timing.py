"""Repeat-and-summarise timing: warm-up calls are run and dropped, the rest are summarised by their median.

Example:
    t = time_calls(lambda: rt.train_step(mbs, 1e-3), repeats=10, warmup=2)
    t.median, t.p10, t.p90, t.samples
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in ``[0, 100]`` of ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Steady-state samples of one measurement, in seconds (warm-up excluded).

    Attributes:
        samples: seconds per repeat, in the order measured.
    """

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def p10(self) -> float:
        return percentile(self.samples, 10)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 90)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary with the raw samples."""
        return {"median_s": self.median, "p10_s": self.p10, "p90_s": self.p90, "samples_s": list(self.samples)}


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (wall clock each).

    Args:
        fn: the measured call (must block until its work is done).
        repeats: timed calls (>= 1).
        warmup: untimed calls first (>= 0).

    Returns:
        The timed samples.

    Raises:
        ValueError: ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))


def intervals(stamps: Sequence[float], start: float, warmup: int) -> Timing:
    """Per-item times of a stream from the arrival times of its items (for pipelined runs).

    Args:
        stamps: ``perf_counter`` time at which each item arrived.
        start: time the stream was started (the first interval is measured from it).
        warmup: leading items to drop (pipeline fill).

    Returns:
        Seconds between consecutive arrivals after the warm-up items.
    """
    edges = [start, *stamps]
    gaps = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return Timing(tuple(gaps[warmup:]))
