"""Data streams an encoder rank can pull from until (or besides) the Ray Data pipeline: picklable, so they can be
handed to actors.

Micro-batch ``g`` of the run (counted over all ranks: rank ``r`` of ``W`` yields ``g = t*W + r`` at its ``t``-th
pull) is ``random_batch(cfg, micro_batch_size, seed=data.seed + g)``, so the fused runtime reading the same
``W`` streams round-robin sees exactly the batches the encoder ranks see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mimo_ray.config import Config
from mimo_ray.model.inputs import random_batch


class RandomBatchStream:
    """Endless correctly shaped random C1 micro-batches for one encoder data-parallel rank.

    Args:
        cfg: config (shapes, ``data.micro_batch_size``, ``data.seed``).
        rank: data-parallel rank of the reader.
        world_size: number of readers.
        start: global micro-batch index to start from (resuming).
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, start: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = self.start + self.rank
        while True:
            yield random_batch(self.cfg, self.cfg.data.micro_batch_size, seed=self.cfg.data.seed + index)
            index += self.world_size


class ListStream:
    """A fixed list of micro-batches, replayed once per ``iter()`` (picklable; for tests and replays).

    Args:
        batches: C1 micro-batches.
    """

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = list(batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


def random_streams(cfg: Config) -> list[RandomBatchStream]:
    """One :class:`RandomBatchStream` per encoder data-parallel rank."""
    dp = cfg.parallel.encoder_dp
    return [RandomBatchStream(cfg, rank=r, world_size=dp) for r in range(dp)]
