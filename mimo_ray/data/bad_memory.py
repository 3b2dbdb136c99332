"""The pipeline's memory of bad rows: a row known to be bad is not decoded again, and a resumed run consumes exactly
the sample ids the uninterrupted run would have.

    memory = BadMemory(retry_epochs=1)
    memory.record("syn-7", epoch=0, stage="open")       # deterministic: bad from epoch 0 on, never decoded again
    memory.record("syn-9", epoch=0, stage="timeout")    # transient: the outcome of epoch 0 only
    memory.verdict("syn-7", 3), memory.verdict("syn-9", 1)   # → "open", None (syn-9 is tried again in epoch 1)

**Facts.** A failure is *deterministic* when decoding the same file again must fail the same way (a malformed row,
tags, text length, a missing, undecodable, short or truncated file): the row is bad from the epoch it first failed
in on. It is *transient* when the decoder hung or died, or an unexpected exception escaped (:data:`TRANSIENT_STAGES`):
the failure is the outcome of that epoch only. A transiently failing row is tried again in later epochs, at most
``retry_epochs`` times (``data.decode_retry_epochs``; each try is ``1 + data.decode_retries`` decoder calls), then it
is given up for good.

**Verdicts.** ``verdict(id, epoch)`` is the stage a row is bad with in ``epoch`` according to the facts, or ``None``
(decode it). It depends only on facts of that row at epochs up to ``epoch``, so any process that knows the facts
in plan order (the collate step, the driver replaying a position) reaches the same verdicts, and a decode task that
skips a row by a verdict skips only rows the in-order consumer treats as bad too. The facts live in the run's
``quarantine.jsonl`` (one record per deterministic id, one per transient ``(id, epoch)``) and in the checkpoint's
``data_state`` (:meth:`BadMemory.to_state`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mimo_ray.data.quarantine import (
    DETERMINISTIC_STAGES,
    TRANSIENT_STAGES,
    BadBudget,
    BadRow,
    QuarantineLog,
    kind_of,
    read_quarantine,
)

__all__ = ["DETERMINISTIC_STAGES", "TRANSIENT_STAGES", "WAIT", "BadMemory", "BadRowKeeper", "BadRowRegistry", "kind_of"]
STATE_VERSION = 1


class BadMemory:
    """Known bad rows of one manifest split, keyed by row id.

    Args:
        retry_epochs: later epochs in which a transiently failed row is tried again before it is given up.
    """

    def __init__(self, retry_epochs: int = 1) -> None:
        if retry_epochs < 0:
            raise ValueError(f"data.decode_retry_epochs={retry_epochs} must be >= 0")
        self.retry_epochs = retry_epochs
        self.deterministic: dict[str, tuple[int, str]] = {}  # id → (first epoch it failed in, stage)
        self.transient: dict[str, dict[int, str]] = {}  # id → {epoch it failed in: stage}

    def __len__(self) -> int:
        return len(self.deterministic.keys() | self.transient.keys())

    def record(self, rid: str, epoch: int, stage: str) -> bool:
        """Remember that ``rid`` failed at ``stage`` in ``epoch``; returns whether this was not known yet."""
        if kind_of(stage) == "deterministic":
            known = self.deterministic.get(rid)
            if known is not None and known[0] <= epoch:
                return False
            self.deterministic[rid] = (epoch, stage)
            return True
        epochs = self.transient.setdefault(rid, {})
        if epoch in epochs:
            return False
        epochs[epoch] = stage
        return True

    def verdict(self, rid: str, epoch: int) -> str | None:
        """The stage ``rid`` is bad with in ``epoch`` (known, not to be decoded), or ``None`` to decode it."""
        known = self.deterministic.get(rid)
        if known is not None and known[0] <= epoch:
            return known[1]
        failed = self.transient.get(rid)
        if failed:
            if epoch in failed:
                return failed[epoch]  # the recorded outcome of this epoch (e.g. met before a resume)
            earlier = [e for e in failed if e < epoch]
            if len(earlier) > self.retry_epochs:
                return failed[max(earlier)]  # failed in 1 + retry_epochs epochs: given up
        return None

    def horizon(self) -> int:
        """An epoch after which verdicts no longer change (every fact is older)."""
        epochs = [e for e, _ in self.deterministic.values()]
        epochs += [e for failed in self.transient.values() for e in failed]
        return max(epochs, default=-1) + 1

    def merge(self, other: BadMemory) -> BadMemory:
        """Add ``other``'s facts (in place); returns ``self``."""
        for rid, (epoch, stage) in other.deterministic.items():
            self.record(rid, epoch, stage)
        for rid, failed in other.transient.items():
            for epoch, stage in failed.items():
                self.record(rid, epoch, stage)
        return self

    def copy(self) -> BadMemory:
        return BadMemory(self.retry_epochs).merge(self)

    # ----- persistence
    def to_state(self) -> dict[str, Any]:
        """JSON-able facts (``epoch`` keys as strings)."""
        return {
            "version": STATE_VERSION,
            "retry_epochs": self.retry_epochs,
            "deterministic": {rid: {"epoch": e, "stage": s} for rid, (e, s) in sorted(self.deterministic.items())},
            "transient": {rid: {str(e): s for e, s in sorted(f.items())} for rid, f in sorted(self.transient.items())},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, retry_epochs: int | None = None) -> BadMemory:
        """Facts saved by :meth:`to_state` (``retry_epochs``, when given, overrides the saved bound).

        Raises:
            ValueError: an unknown state version or a malformed entry (naming it).
        """
        state = state or {}
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"data_state memory version {version!r} is not supported (expected {STATE_VERSION})")
        bound = retry_epochs if retry_epochs is not None else int(state.get("retry_epochs", 1))
        memory = cls(bound)
        try:
            for rid, fact in state.get("deterministic", {}).items():
                memory.record(str(rid), int(fact["epoch"]), str(fact["stage"]))
            for rid, failed in state.get("transient", {}).items():
                for epoch, stage in failed.items():
                    memory.record(str(rid), int(epoch), str(stage))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed data_state memory entry: {err!r}") from err
        return memory

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], retry_epochs: int, split: str | None = None) -> BadMemory:
        """Facts of quarantine records (:func:`mimo_ray.data.quarantine.read_quarantine`).

        Records written before epochs were recorded count from epoch ``-1`` (known before this run). Transient
        records of another split are ignored (their outcome belongs to that split's pass); deterministic ones hold
        for every split.
        """
        memory = cls(retry_epochs)
        for rec in records:
            stage = str(rec.get("stage", "error"))
            if kind_of(stage) == "transient" and split is not None and rec.get("split", split) not in ("", split):
                continue
            memory.record(str(rec["id"]), int(rec.get("epoch", -1)), stage)
        return memory


#: :meth:`BadRowRegistry.ask` answer: the row's previous appearance in the plan is not decoded yet.
WAIT = "<wait>"


class BadRowRegistry:
    """The memory shared with decode tasks (run as a Ray actor with ``num_cpus=0``), so a row found bad in one epoch
    of a long multi-epoch plan is not decoded again in the next, even when both are decoded at the same time.

    A decode task asks about its block's rows before decoding (:meth:`ask`) and reports when its block is
    :meth:`done`, with the failures it met. A row whose previous appearance in the plan is being decoded right now
    (asked by a task that is not done) is answered :data:`WAIT`: the task asks again until it is done (bounded, so
    a task that died holds nobody up for long). A previous appearance that no task has started is not waited for:
    Ray Data may start a later block first, and when the decode pool has room for one task only, the earlier block
    could not start until the waiting one gave up (a stall of ``timeout_s * (1 + retries)`` per block, seen on a
    one-node decode pool); the row is then decoded twice at worst. An optimisation only: the in-order consumer
    (:class:`BadRowKeeper`) decides what is bad.

    Args:
        state: :meth:`BadMemory.to_state` of the facts known at the start.
        retry_epochs: ``data.decode_retry_epochs``.
        first_epoch: the plan's first epoch (it may start mid-epoch); every later epoch is planned whole.
        first_ids: ids planned in ``first_epoch``.
    """

    def __init__(self, state: dict[str, Any], retry_epochs: int, first_epoch: int = 0,
                 first_ids: Iterable[str] = ()) -> None:  # fmt: skip
        self.memory = BadMemory.from_state(state, retry_epochs)
        self.first_epoch = first_epoch
        self.first_ids = set(first_ids)
        self.last_done: dict[str, int] = {}  # id → latest epoch whose appearance is done
        self.in_flight: set[tuple[str, int]] = set()  # (id, epoch) asked by a task that is not done yet

    def _previous(self, rid: str, epoch: int) -> int | None:
        """The epoch of ``rid``'s previous appearance in the plan (``None``: this is its first)."""
        if epoch <= self.first_epoch or (epoch - 1 == self.first_epoch and rid not in self.first_ids):
            return None
        return epoch - 1

    def ask(self, keys: list[tuple[str, int]]) -> list[str | None]:
        """Per ``(id, epoch)``: the stage it is known bad with, :data:`WAIT`, or ``None`` (decode it). Keys not known
        bad are in flight (the asking task will decode them) until :meth:`done`.
        """
        out: list[str | None] = []
        for rid, epoch in keys:
            stage = self.memory.verdict(rid, epoch)
            previous = self._previous(rid, epoch) if stage is None else None
            if (previous is not None and self.last_done.get(rid, previous - 1) < previous
                    and (rid, previous) in self.in_flight):  # fmt: skip
                stage = WAIT
            if stage is None or stage == WAIT:
                self.in_flight.add((rid, epoch))
            out.append(stage)
        return out

    def done(self, keys: list[tuple[str, int]], failures: list[tuple[str, int, str]]) -> int:
        """Remember a block's failures and that its rows are done; returns how many facts were new."""
        new = sum(self.memory.record(rid, epoch, stage) for rid, epoch, stage in failures)
        for rid, epoch in keys:
            self.last_done[rid] = max(epoch, self.last_done.get(rid, epoch))
            self.in_flight.discard((rid, epoch))
        return new

    def verdicts(self, keys: list[tuple[str, int]]) -> list[str | None]:
        """The memory's verdicts (no waiting)."""
        return [self.memory.verdict(rid, epoch) for rid, epoch in keys]


class BadRowKeeper:
    """The in-order authority on bad rows of one pass over a manifest (the driver's stream or the collate actor):
    known rows are bad by the memory's verdict, new failures are remembered and written to the quarantine file, and
    every bad row counts against ``data.max_bad_fraction``.

    Args:
        qpath: the quarantine JSONL (``None``: write nothing).
        manifest: absolute manifest path.
        num_rows, max_bad_fraction: for the bad-data gate.
        memory: the facts known at the start (copied).
    """

    def __init__(self, qpath: Any, manifest: str, num_rows: int, max_bad_fraction: float, memory: BadMemory) -> None:
        self.log = QuarantineLog(qpath, manifest)
        self.budget = BadBudget(num_rows, max_bad_fraction, manifest)
        self.memory = memory.copy()

    def known(self, rid: str, epoch: int) -> str | None:
        """The stage ``rid`` is already known bad with in ``epoch`` (``None``: not known)."""
        return self.memory.verdict(rid, epoch)

    def on_bad(self, epoch: int, bad: BadRow) -> None:
        """A bad row met in plan order: remember and record it unless it was known, then count it.

        Raises:
            DataQualityError: the epoch's bad rows exceed the gate.
        """
        if self.memory.verdict(bad.id, epoch) is None:
            self.memory.record(bad.id, epoch, bad.stage)
            bad.epoch, bad.kind = epoch, kind_of(bad.stage)
            self.log.add(bad)
        self.budget.add(epoch, bad)


def memory_of(qpath: Any, manifest: str, split: str, retry_epochs: int) -> BadMemory:
    """The facts the quarantine file at ``qpath`` holds for ``manifest`` (empty when there is no file)."""
    return BadMemory.from_records(read_quarantine(qpath, manifest), retry_epochs, split)
