"""Where a driver-side data source stands, in global micro-batches (shared by every source)."""

from __future__ import annotations

from typing import Any


class MicroBatchCursor:
    """Mixin for data sources that hold ``self.cfg`` and ``self.next_micro`` (the next global micro-batch)."""

    cfg: Any
    next_micro: int

    @property
    def micro_per_step(self) -> int:
        """Micro-batches in one optimizer step."""
        return self.cfg.data.global_batch_size // self.cfg.data.micro_batch_size

    @property
    def samples_consumed(self) -> int:
        """Samples handed out so far (the resume position)."""
        return self.next_micro * self.cfg.data.micro_batch_size
