"""Random C1 micro-batches as a deterministic, resumable stream (used until/unless a manifest is given).

Global micro-batch ``m`` always has the same content (seeded by ``seed`` and ``m``), so the fused runtime, the
disaggregated runtime and a resumed run all see identical data. Encoder rank ``r`` of ``E`` gets
``m = r, r + E, r + 2E, ...`` (round-robin micro-batch routing).
"""

from __future__ import annotations

from collections.abc import Iterator

from mimo_ray.config import Config
from mimo_ray.data.cursor import MicroBatchCursor
from mimo_ray.model.inputs import Batch, random_batch


def microbatch_seed(seed: int, index: int) -> int:
    """Seed of global micro-batch ``index``."""
    return (seed * 7_919 + index * 104_729 + 17) % (2**31)


class RandomBatchStream:
    """Picklable iterator of random micro-batches for one encoder rank (handed to an actor).

    Args:
        cfg: config (shapes, ``data.micro_batch_size``, ``train.seed``).
        rank: this stream's rank among ``num_ranks``.
        num_ranks: encoder data-parallel ranks sharing the global micro-batch sequence.
        start: first global micro-batch index to consider (resume point).
    """

    def __init__(self, cfg: Config, rank: int = 0, num_ranks: int = 1, start: int = 0) -> None:
        self.cfg = cfg
        self.rank = rank
        self.num_ranks = num_ranks
        first = start + ((rank - start) % num_ranks)
        self.next_index = first

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        index = self.next_index
        self.next_index += self.num_ranks
        batch = random_batch(self.cfg, self.cfg.data.micro_batch_size, microbatch_seed(self.cfg.train.seed, index))
        batch["ids"] = [f"rand-{index}-{i}" for i in range(self.cfg.data.micro_batch_size)]
        return batch


class RandomDataSource(MicroBatchCursor):
    """Driver-side view: micro-batches per step (fused runtime) or per-rank streams (disaggregated runtime).

    Args:
        cfg: config.
        start_sample: samples already consumed (``step * global_batch_size`` on resume).
    """

    def __init__(self, cfg: Config, start_sample: int = 0) -> None:
        self.cfg = cfg
        self.next_micro = start_sample // cfg.data.micro_batch_size
        self.quarantined = 0

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next optimizer step, in global order."""
        stream = RandomBatchStream(self.cfg, 0, 1, self.next_micro)
        self.next_micro += self.micro_per_step
        return [next(stream) for _ in range(self.micro_per_step)]

    def rank_streams(self, num_ranks: int) -> list[RandomBatchStream]:
        """One stream per encoder rank, starting where the driver is."""
        return [RandomBatchStream(self.cfg, r, num_ranks, self.next_micro) for r in range(num_ranks)]

    def advance(self, steps: int = 1) -> None:
        """Record that ``steps`` optimizer steps were consumed by the rank streams."""
        self.next_micro += steps * self.micro_per_step

    def close(self) -> None:
        """Nothing to release."""
