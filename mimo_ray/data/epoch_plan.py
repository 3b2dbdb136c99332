"""Which manifest row each plan position visits, epoch by epoch (a plan is an Arrow table of positions)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

#: A plan row: global position, epoch, manifest row, and the stage it is already known bad with (null: decode it).
PLAN_SCHEMA = pa.schema([("pos", pa.int64()), ("epoch", pa.int64()), ("row", pa.int64()), ("known", pa.string())])


class EpochPlan:
    """Which manifest row each plan position visits: epoch ``e`` is ``permutation(seed, e)`` of the rows.

    Args:
        num_rows: rows in the manifest.
        seed: ``data.seed``.
        shuffle: shuffle per epoch (train with ``data.shuffle``); otherwise file order.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_rows).astype(np.int64)

    def table(
        self, epoch: int, start: int = 0, stop: int | None = None, known: dict[int, str] | None = None
    ) -> pa.Table:
        """Plan rows ``(pos, epoch, row, known)`` of ``epoch`` from offset ``start`` to ``stop``; ``known`` maps
        manifest rows already known bad in this epoch to their stage (they are not decoded).
        """
        stop = self.num_rows if stop is None else stop
        rows = self.order(epoch)[start:stop]
        pos = epoch * self.num_rows + np.arange(start, start + rows.size, dtype=np.int64)
        stages = [known.get(int(r)) for r in rows] if known else [None] * rows.size
        return pa.table({"pos": pos, "epoch": np.full(rows.size, epoch, dtype=np.int64), "row": rows,
                         "known": pa.array(stages, type=pa.string())}, schema=PLAN_SCHEMA)  # fmt: skip

    def locate(
        self, samples: int, bad_rows: set[int] | Callable[[int], set[int]], horizon: int = 0
    ) -> tuple[int, int, int]:
        """Where the good sample number ``samples`` comes from: ``(epoch, rows consumed in it, bad rows before)``.

        Args:
            samples: good samples consumed.
            bad_rows: manifest rows bad in every epoch, or a function ``epoch → rows bad in that epoch``.
            horizon: with a function, an epoch from which its answer no longer changes.

        Raises:
            RuntimeError: every row is bad.
        """
        bad_of = bad_rows if callable(bad_rows) else (lambda _epoch: bad_rows)
        epoch, rest = 0, samples
        while True:
            good = self.num_rows - len(bad_of(epoch))
            if good <= 0 and rest > 0 and epoch >= horizon:
                raise RuntimeError("every row of the manifest is quarantined; nothing to resume from")
            if rest == 0 or rest < good:
                break
            if epoch >= horizon:  # every later epoch has the same bad rows: skip the whole epochs at once
                epoch, rest = epoch + rest // good, rest % good
                continue
            rest -= good
            epoch += 1
        bad = bad_of(epoch)
        is_bad = np.isin(self.order(epoch), np.fromiter(bad, dtype=np.int64, count=len(bad)))
        good_before = np.cumsum(~is_bad)
        # Just past the rest-th good row (bad rows right after it are met again, as an uninterrupted run meets them).
        offset = int(np.searchsorted(good_before, rest, side="left")) + 1 if rest else 0
        return epoch, offset, int(is_bad[:offset].sum())
