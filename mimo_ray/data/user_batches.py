"""A user's own batches as a training data source: any iterable of C1 global batches, split into micro-batches.

    source = IterableBatchSource(cfg, batches)     # batches: a list, a class with __iter__, a generator function
    micro = source.next_step()                     # data.global_batch_size // data.micro_batch_size micro-batches

Each item of the iterable is one optimizer step's samples: a C1 batch dict (``input_ids``, ``labels``,
``loss_mask``, ``position_ids`` ``[B, S]`` with ``B = data.global_batch_size``, and ``modality_inputs
{modality: {encoder: {kwarg: [B, ...]}}}``) that is cut along dim 0, or a list of micro-batches of
``data.micro_batch_size`` samples each (for inputs whose rows are not one per sample). The driver feeds them to the
runtime (they already live in the driver process); the runtime routes micro-batches to encoder ranks and pieces to LM
ranks as it does for manifest data. Resuming skips the global batches a checkpoint consumed; a re-iterable object
(not a one-shot iterator) starts a new pass when it ends, like an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mimo_ray.config import Config
from mimo_ray.data.cursor import MicroBatchCursor

Batch = dict[str, Any]
#: The ``[B, S]`` keys every C1 batch carries.
C1_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def _rows(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else None


def _cut(value: Any, start: int, stop: int, where: str, size: int) -> Any:
    """``value[start:stop]`` for every tensor leaf of a (nested dict of) inputs with ``size`` rows."""
    if isinstance(value, dict):
        return {k: _cut(v, start, stop, f"{where}[{k!r}]", size) for k, v in value.items()}
    rows = _rows(value)
    if rows is None:
        return value
    if rows != size:
        raise ValueError(
            f"{where} has {rows} rows for a global batch of {size} samples: give one row per sample, or hand the "
            "trainer a list of micro-batches for this step"
        )
    return value[start:stop]


def check_c1(batch: Any, where: str, samples: int) -> None:
    """Raise when ``batch`` is not a C1 batch of ``samples`` samples, naming the item and the key at fault."""
    if not isinstance(batch, dict):
        raise TypeError(f"{where} is a {type(batch).__name__}, not a C1 batch dict")
    for key in C1_KEYS:
        if key not in batch:
            raise ValueError(f"{where} has no {key!r} (a C1 batch needs {', '.join(C1_KEYS)} and modality_inputs)")
        shape = tuple(getattr(batch[key], "shape", ()))
        if len(shape) != 2 or shape[0] != samples:
            raise ValueError(f"{where}[{key!r}] has shape {shape}; expected [{samples}, S]")
    if tuple(batch["input_ids"].shape) != tuple(batch["labels"].shape):
        raise ValueError(f"{where}: labels {tuple(batch['labels'].shape)} differ from input_ids "
                         f"{tuple(batch['input_ids'].shape)}")
    inputs = batch.get("modality_inputs") or {}
    if not isinstance(inputs, dict):
        raise ValueError(f"{where}['modality_inputs'] must be {{modality: {{encoder: {{kwarg: tensor}}}}}}")


def split_global_batch(batch: Batch | list[Batch], cfg: Config, index: int) -> list[Batch]:
    """One global batch → its micro-batches in sample order.

    Args:
        batch: a C1 dict of ``data.global_batch_size`` samples, or a list of C1 micro-batches.
        cfg: the config (``data.global_batch_size``, ``data.micro_batch_size``).
        index: the item's position in the iterable (named in errors).

    Returns:
        ``global_batch_size / micro_batch_size`` micro-batches; each gets ``ids`` (``batch-<index>-<i>`` unless the
        batch gave per-sample ``ids``).

    Raises:
        ValueError / TypeError: naming the item, the key and the shapes at fault.
    """
    gbs, mbs = cfg.data.global_batch_size, cfg.data.micro_batch_size
    where = f"data item {index}"
    if isinstance(batch, list | tuple):
        if len(batch) * mbs != gbs:
            raise ValueError(f"{where} is a list of {len(batch)} micro-batches; data.global_batch_size={gbs} needs "
                             f"{gbs // mbs} of data.micro_batch_size={mbs}")
        out = []
        for m, micro in enumerate(batch):
            check_c1(micro, f"{where}[{m}]", mbs)
            ids = micro.get("ids") or [f"batch-{index}-{m * mbs + i}" for i in range(mbs)]
            out.append({**micro, "ids": list(ids)})
        return out
    check_c1(batch, where, gbs)
    ids = list(batch.get("ids") or [f"batch-{index}-{i}" for i in range(gbs)])
    if len(ids) != gbs:
        raise ValueError(f"{where}['ids'] has {len(ids)} entries for {gbs} samples")
    out = []
    for start in range(0, gbs, mbs):
        stop = start + mbs
        micro = {k: batch[k][start:stop] for k in C1_KEYS}
        micro["modality_inputs"] = _cut(batch.get("modality_inputs") or {}, start, stop,
                                        f"{where}['modality_inputs']", gbs)
        if batch.get("output_targets"):
            micro["output_targets"] = batch["output_targets"]
        micro["ids"] = ids[start:stop]
        out.append(micro)
    return out


class IterableBatchSource(MicroBatchCursor):
    """The driver-side data source over a user's iterable of global batches (see the module docstring).

    Args:
        cfg: the config.
        batches: an iterable of global batches, or a zero-argument function returning one.
        start_sample: samples already consumed (a resume): that many global batches are skipped.
    """

    #: The driver hands this source's micro-batches to the runtime (no per-rank streams).
    driver_fed = True

    def __init__(self, cfg: Config, batches: Iterable | Callable[[], Iterable], start_sample: int = 0) -> None:
        self.cfg = cfg
        self._batches = batches
        self.quarantined = 0
        self.next_micro = 0
        self._index = 0  # items taken from the iterable (across passes)
        self._in_pass = 0  # the next item's position in the current pass (it names the samples' ids)
        self._it: Iterator | None = None
        self._one_shot = False
        skip = start_sample // cfg.data.global_batch_size
        for _ in range(skip):
            self._next_item()
        self.next_micro = skip * self.micro_per_step

    def _open(self) -> Iterator:
        factory = callable(self._batches) and not hasattr(self._batches, "__iter__")
        source = self._batches() if factory else self._batches
        it = iter(source)
        self._one_shot = it is source
        return it

    def _next_item(self) -> Any:
        if self._it is None:
            self._it = self._open()
        try:
            item = next(self._it)
        except StopIteration:
            if self._one_shot or self._index == 0:
                raise RuntimeError(
                    f"the data iterable ended after {self._index} global batches (train.max_steps="
                    f"{self.cfg.train.max_steps}); give a re-iterable object (a list, a class with __iter__, or a "
                    "function returning an iterator) to train over several passes"
                ) from None
            self._it = self._open()  # a new pass
            self._in_pass = 0
            item = next(self._it)
        self._index += 1
        self._in_pass += 1
        return item

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next optimizer step, in sample order."""
        item = self._next_item()
        micro = split_global_batch(item, self.cfg, self._in_pass - 1)
        self.next_micro += self.micro_per_step
        return micro

    def rank_streams(self, num_ranks: int) -> list[Any]:
        raise TypeError("a user iterable is fed by the driver (driver_fed); it has no per-rank streams")

    def advance(self, steps: int = 1) -> None:
        """Nothing: :meth:`next_step` already moved the position."""

    def close(self) -> None:
        """Nothing held."""
