"""Data streams an encoder rank can pull from: picklable, so they can be handed to actors.

Random data (until a manifest is given) is :class:`mimo_ray.data.random_stream.RandomBatchStream`: global
micro-batch ``m`` always has the same content and rank ``r`` of ``E`` reads ``m = r, r + E, …``, so the fused runtime
reading the ``E`` streams round-robin sees exactly the batches the encoder ranks see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mimo_ray.config import Config
from mimo_ray.data.random_stream import RandomBatchStream


class ListStream:
    """A fixed list of micro-batches, replayed once per ``iter()`` (picklable; for tests and replays).

    Args:
        batches: C1 micro-batches.
    """

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = list(batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


def random_streams(cfg: Config, start: int = 0) -> list[RandomBatchStream]:
    """One random stream per encoder data-parallel rank, starting at global micro-batch ``start``."""
    dp = cfg.parallel.encoder_dp
    return [RandomBatchStream(cfg, rank=r, num_ranks=dp, start=start) for r in range(dp)]
