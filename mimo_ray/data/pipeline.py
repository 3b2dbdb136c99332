"""Ray Data input pipeline: manifest → plan → parallel decode (isolated, time-limited) → tokenise → C1 micro-batches.

    src = ManifestDataSource(cfg, "train", start_sample=step * cfg.data.global_batch_size,
                             data_state=driver_json.get("data_state"))   # None for a fresh run
    micro = src.next_step()                 # fused runtime: the micro-batches of one optimizer step, global order
    streams = src.rank_streams(2)           # disaggregated: rank r gets global micro-batches r, r+2, … (actors pull)
    src.advance(1); src.checkpoint_extras(); src.quarantined; src.close()

**Order.** Epoch ``e`` visits the manifest in ``permutation(seed, e)`` (identity when not shuffling). Decode runs
with ``preserve_order``, so the good samples come in plan order whatever the decode timing; micro-batch ``m`` is the
good samples ``m*B … m*B+B-1``. Per-rank streams come from one collate actor (the same :class:`MicroBatcher`) and a
``streaming_split`` over one-row blocks, which Ray Data hands out round-robin; each stream checks the indices it gets.

**Bad rows are remembered** (:mod:`mimo_ray.data.bad_memory`). A row that failed for a deterministic reason is bad
from then on and is not decoded again (plan rows carry the verdicts known when they are planned; the per-rank
streams' decode tasks also ask a shared registry, so a row found bad in one epoch is skipped in the next); a row whose
decode hung or crashed is tried again in at most ``data.decode_retry_epochs`` later epochs. The in-order consumer
(driver or collate actor) applies the same verdicts, so what is consumed never depends on decode timing.

**Resume.** A position is ``samples consumed``. Every bad row met is in ``<train.output_dir>/quarantine.jsonl``
(with its epoch) before any later sample is handed out, and the checkpoint's ``data_state``
(:meth:`ManifestDataSource.checkpoint_extras`) holds the facts and the exact plan position, so ``start_sample``
maps back to ``(epoch, rows consumed)`` exactly and recorded outcomes (e.g. a timeout met before the resume) are
honoured: the resumed run yields the sample ids an uninterrupted run would.

**Resources.** Decode tasks get ``data.num_decode_workers`` slots and never more logical CPUs than the cluster
minus what the stage actors reserve (``resource_limits``), with fractional CPUs when that is less than one per
worker, so decode can neither starve the stages nor be starved by them (NOTES §3). The pipeline picks its own
settings: operator resource reservation off and ~15 clips per task (NOTES §4: 0.93 of a process pool).

**Decode pool.** On a cluster with a decode pool (``ray_cluster.yaml``'s ``cpu_decode`` nodes expose a custom
resource of the same name), decode tasks and the collate actor ask for that resource, so they run on the pool (and an
autoscaler grows it for them); the CPU budget is then the pool's. Without it they run anywhere
(``parallel.decode_resource``: ``auto``, a resource name to always ask for, or ``none``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from mimo_ray.data.bad_memory import BadMemory, BadRowKeeper, BadRowRegistry, memory_of
from mimo_ray.data.collate import MICROBATCH_SCHEMA, BatchLayout, MicroBatch, MicroBatcher
from mimo_ray.data.cursor import MicroBatchCursor
from mimo_ray.data.epoch_plan import EpochPlan
from mimo_ray.data.manifest import Manifest, media_folders, read_manifest
from mimo_ray.data.prepare import DecodeOptions
from mimo_ray.data.quarantine import bad_ids, quarantine_path
from mimo_ray.data.ray_dataset import (
    COLLATE_POOL_SHARE,
    clips_per_task,
    closing_iter,
    decode_dataset,
    decode_pool,
    ensure_ray,
    iter_batches_ending_gently,
    pool_remote_args,
)
from mimo_ray.data.ray_dataset import DECODE_POOL as DECODE_POOL
from mimo_ray.data.tokenizer import ChatTokenizer

log = logging.getLogger("mimo_ray")

DATA_STATE_VERSION = 1
SPLIT_MODES = {"train": "train", "val": "eval", "infer": "infer", "validate": "eval"}
_GET_TIMEOUT_S = 300.0


class TimedIterator:
    """Runs a generator in a background thread and hands its items over with a stall timeout, so a pipeline that
    stops producing raises instead of hanging the driver silently (NOTES §3).

    Args:
        source: the generator.
        timeout_s: longest wait for one item.
        what: names the stream in the error.
    """

    _END = object()

    def __init__(self, source: Any, timeout_s: float, what: str) -> None:
        import queue
        import threading

        self.timeout_s = timeout_s
        self.what = what
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._run, name=f"mimo-data-{what}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("item", item), timeout=0.5)
                        break
                    except Exception:  # queue.Full: wait for the consumer or a stop
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(("error", err))
        finally:
            self._source.close()

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Any:
        import queue

        try:
            kind, value = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"the {self.what} data pipeline produced nothing for {self.timeout_s:g} s (train.step_timeout_s)"
            ) from None
        if kind == "error":
            raise value
        if kind == "end":
            self._queue.put(("end", None))
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except Exception:  # queue.Empty
                break
        self._thread.join(timeout=10)


@dataclass
class Position:
    """A data position: samples handed out, and the plan position they correspond to."""

    samples: int
    epoch: int
    rows_consumed: int
    bad_before: int = 0  # bad rows among the rows consumed of this epoch (for the bad-data gate)

    def to_dict(self) -> dict[str, int]:
        return {"samples": self.samples, "epoch": self.epoch, "rows_consumed": self.rows_consumed,
                "bad_before": self.bad_before}  # fmt: skip


def build_dataset(
    cfg: Any, split: str, *, manifest_path: str | None = None, epoch: int = 0, reserved_cpus: float = 0.0
) -> Any:
    """One epoch of decoded, tokenised samples of ``split`` as a Ray Data ``Dataset`` (bad rows included, with
    ``ok=False``), in plan order.

    Args:
        cfg: config.
        split: ``train`` (shuffled per ``data.shuffle``, jitter), ``val``/``validate`` (file order, uniform frames)
            or ``infer`` (prompt-only encodings).
        manifest_path: overrides ``data.data_path``/``data.val_path``.
        epoch: which epoch's order and jitter.
        reserved_cpus: logical CPUs the stage actors hold (kept out of the decode budget).
    """
    ensure_ray(cfg)
    import ray

    manifest = read_manifest(manifest_path or _split_path(cfg, split), media_folders(cfg))
    tokenizer = ChatTokenizer.from_config(cfg)
    opts = DecodeOptions.from_config(cfg, SPLIT_MODES[split], tokenizer, ray.put(manifest.table))
    plan = EpochPlan(len(manifest), cfg.data.seed, split == "train" and cfg.data.shuffle)
    return decode_dataset([plan.table(epoch)], opts, cfg, reserved_cpus=reserved_cpus)


def _split_path(cfg: Any, split: str) -> str:
    path = cfg.data.val_path if split == "val" else cfg.data.data_path
    if path is None:
        flag = "data.val_path" if split == "val" else "data.data_path"
        raise ValueError(f"{flag} is not set; the {split} split needs a manifest")
    return path


class _CollateFn:
    """The collate actor (Ray Data ``ActorPoolStrategy(size=1)``): decoded rows in plan order → micro-batch rows."""

    def __init__(self, layout: BatchLayout, micro_batch_size: int, start_index: int, qpath: str, manifest: str,
                 num_rows: int, max_bad_fraction: float, epoch: int, bad_before: int, memory: dict[str, Any],
                 retry_epochs: int) -> None:  # fmt: skip
        self.keeper = BadRowKeeper(qpath, manifest, num_rows, max_bad_fraction,
                                   BadMemory.from_state(memory, retry_epochs))  # fmt: skip
        self.keeper.budget.start_epoch(epoch, bad_before)
        self.batcher = MicroBatcher(layout, micro_batch_size, start_index, self.keeper.on_bad, manifest, "train",
                                    known_bad=self.keeper.known)  # fmt: skip

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = [mb.to_row() for mb in self.batcher.add(table)]
        return pa.Table.from_pylist(rows, schema=MICROBATCH_SCHEMA)


class RankStream:
    """Picklable iterator of C1 micro-batches for one encoder rank, over its ``streaming_split`` shard.

    Args:
        shard: the rank's ``StreamSplitDataIterator``.
        rank, num_ranks: this rank; it gets global micro-batches ``first_index + k * num_ranks``.
        first_index: global index of its first micro-batch.
        layout: shapes for rebuilding tensors.
    """

    def __init__(self, shard: Any, rank: int, num_ranks: int, first_index: int, layout: BatchLayout) -> None:
        self.shard = shard
        self.rank = rank
        self.num_ranks = num_ranks
        self.expected = first_index
        self.layout = layout
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}

    def __iter__(self) -> RankStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._rows is None:
            self._rows = iter(self.shard.iter_rows())
        try:
            row = next(self._rows)
        except StopIteration:
            raise RuntimeError(
                f"data rank {self.rank}: the planned training data ran out before micro-batch {self.expected} "
                "(the plan covers train.max_steps plus slack; was train.max_steps raised after the stream was made?)"
            ) from None
        if int(row["index"]) != self.expected:
            raise RuntimeError(
                f"data rank {self.rank}/{self.num_ranks} got micro-batch {row['index']}, expected {self.expected}: "
                "Ray Data's streaming_split did not deal micro-batches round-robin"
            )
        self.expected += self.num_ranks
        return MicroBatch.from_row(row, self.layout).to_batch(self.layout)


class ManifestDataSource(MicroBatchCursor):
    """A manifest split as micro-batches for the driver (fused) or per-rank streams (disaggregated).

    Same interface as :class:`mimo_ray.data.random_stream.RandomDataSource`, plus :meth:`checkpoint_extras`.

    Args:
        cfg: config (``data.*``, model shapes, ``train.output_dir`` for the quarantine file).
        split: ``train`` (shuffled, jittered, endless epochs) or ``val`` (one pass in file order).
        start_sample: samples already consumed (``step * data.global_batch_size`` on resume).
        manifest_path: overrides the config's path for the split.
        data_state: the ``data_state`` a checkpoint recorded (:meth:`checkpoint_extras`): the bad-row facts and the
            exact plan position at ``start_sample``. ``None`` (a fresh run, or an older checkpoint) replays the
            position from the quarantine file.
        reserved_cpus: logical CPUs the stage actors hold (the caller that places them knows:
            :func:`mimo_ray.runtime.placement.stage_cpu_reservation`), kept out of the decode budget.

    Raises:
        ValueError: a missing manifest, a tokenizer/config mismatch, a ``start_sample`` that is not a whole
            number of micro-batches, or a ``data_state`` of another manifest/split/position (before any decode work
            starts).
    """

    def __init__(self, cfg: Any, split: str = "train", start_sample: int = 0, *,
                 manifest_path: str | None = None, data_state: dict[str, Any] | None = None,
                 reserved_cpus: float = 0.0) -> None:  # fmt: skip
        if split not in ("train", "val"):
            raise ValueError(f"ManifestDataSource split={split!r}; use 'train' or 'val' (inference: infer.py)")
        batch = cfg.data.micro_batch_size
        if start_sample % batch:
            raise ValueError(f"start_sample={start_sample} is not a multiple of data.micro_batch_size={batch}")
        self.cfg = cfg
        self.split = split
        self.reserved_cpus = float(reserved_cpus)
        self.finite = split != "train"
        self.manifest: Manifest = read_manifest(manifest_path or _split_path(cfg, split), media_folders(cfg))
        self.tokenizer = ChatTokenizer.from_config(cfg)
        self.layout = BatchLayout.from_config(cfg)
        self.quarantine_file = quarantine_path(cfg.train.output_dir)
        self.plan = EpochPlan(len(self.manifest), cfg.data.seed, split == "train" and cfg.data.shuffle)
        self.next_micro = start_sample // batch
        self._index = {rid: i for i, rid in enumerate(self.manifest.ids)}
        self._restored: Position | None = None
        memory = self._file_memory()
        if data_state is not None:
            memory.merge(self._check_state(data_state, start_sample))
        self.keeper = BadRowKeeper(self.quarantine_file, self.manifest.path, len(self.manifest),
                                   cfg.data.max_bad_fraction, memory)  # fmt: skip
        ensure_ray(cfg)
        import ray

        self._manifest_ref = ray.put(self.manifest.table)
        self._opts = DecodeOptions.from_config(cfg, SPLIT_MODES[split], self.tokenizer, self._manifest_ref)
        self._stream: Any = None
        self._coordinators: list[Any] = []
        self._registries: list[Any] = []

    @property
    def log(self) -> Any:
        """The quarantine writer of the driver's stream."""
        return self.keeper.log

    @property
    def budget(self) -> Any:
        """The bad-data gate of the driver's stream."""
        return self.keeper.budget

    # ----- bad-row memory
    def _file_memory(self) -> BadMemory:
        return memory_of(self.quarantine_file, self.manifest.path, self.split, self.cfg.data.decode_retry_epochs)

    def _check_state(self, state: dict[str, Any], start_sample: int) -> BadMemory:
        """The memory of a checkpoint's ``data_state`` (and its exact position), after checking it belongs here."""
        where = f"the checkpoint's data_state (split {state.get('split')!r}, manifest {state.get('manifest')!r})"
        if state.get("version") != DATA_STATE_VERSION:
            raise ValueError(f"{where} has version {state.get('version')!r}; expected {DATA_STATE_VERSION}")
        if state.get("split") != self.split or state.get("manifest") != self.manifest.path:
            raise ValueError(f"{where} does not belong to split {self.split!r} of {self.manifest.path!r}")
        if state.get("num_rows") != len(self.manifest):
            raise ValueError(f"{where} was recorded for {state.get('num_rows')} rows; the manifest now has "
                             f"{len(self.manifest)}")  # fmt: skip
        pos = state.get("position") or {}
        if pos.get("samples") != start_sample:
            raise ValueError(f"{where} was recorded at sample {pos.get('samples')}, not at start_sample={start_sample}")
        self._restored = Position(start_sample, int(pos["epoch"]), int(pos["rows_consumed"]),
                                  int(pos.get("bad_before", 0)))  # fmt: skip
        return BadMemory.from_state(state.get("memory"), self.cfg.data.decode_retry_epochs)

    def _memory(self) -> BadMemory:
        """Every fact known now: this source's, and those the collate actor wrote to the quarantine file."""
        return self.keeper.memory.copy().merge(self._file_memory())

    def _bad_rows_of(self, memory: BadMemory) -> Callable[[int], set[int]]:
        """``epoch → manifest rows bad in it`` by ``memory``'s verdicts."""
        ids = [rid for rid in memory.deterministic.keys() | memory.transient.keys() if rid in self._index]

        def bad(epoch: int) -> set[int]:
            return {self._index[rid] for rid in ids if memory.verdict(rid, epoch) is not None}

        return bad

    def _known(self, memory: BadMemory, epoch: int) -> dict[int, str]:
        """``{manifest row: stage}`` of the rows ``memory`` knows bad in ``epoch`` (not decoded)."""
        known = {}
        for rid in memory.deterministic.keys() | memory.transient.keys():
            stage = memory.verdict(rid, epoch)
            if stage is not None and rid in self._index:
                known[self._index[rid]] = stage
        return known

    def _locate(self) -> tuple[int, int, int]:
        """``(epoch, rows consumed in it, bad rows before)`` of the next sample to hand out."""
        if self._restored is not None and self._restored.samples == self.samples_consumed:
            r = self._restored
            return r.epoch, r.rows_consumed, r.bad_before
        memory = self._memory()
        return self.plan.locate(self.samples_consumed, self._bad_rows_of(memory), memory.horizon())

    # ----- positions
    @property
    def quarantined(self) -> int:
        """Distinct bad rows of this manifest in the quarantine file (this run and earlier ones)."""
        return len(bad_ids(self.quarantine_file, self.manifest.path) | {b.id for b in self.log.new})

    def position(self) -> Position:
        """The plan position of the next sample to hand out."""
        return Position(self.samples_consumed, *self._locate())

    def data_state(self) -> dict[str, Any]:
        """What a resumed run needs to consume exactly the sample ids this one would: the exact plan position and
        every bad-row fact (deterministic ids with the epoch they failed in; transient outcomes per epoch).
        Restore with ``ManifestDataSource(cfg, split, start_sample=state["position"]["samples"], data_state=state)``.
        """
        return {
            "version": DATA_STATE_VERSION,
            "split": self.split,
            "manifest": self.manifest.path,
            "num_rows": len(self.manifest),
            "seed": self.cfg.data.seed,
            "position": self.position().to_dict(),
            "memory": self._memory().to_state(),
        }

    def checkpoint_extras(self) -> dict[str, Any]:
        """JSON-able state for the checkpoint: tokenizer, chat template, special-token ids, the data position and
        the ``data_state`` (:meth:`data_state`).
        """
        tok = self.tokenizer.to_dict()
        state = self.data_state()
        return {
            "tokenizer": tok,
            "chat_template": tok["chat_template"],
            "special_token_ids": tok["special_tokens"],
            "data_position": {"split": self.split, "manifest": self.manifest.path, **state["position"]},
            "data_state": state,
        }

    # ----- the driver's stream
    def _driver_batches(self) -> Any:
        epoch, offset, bad_before = self._locate()
        self.budget.start_epoch(epoch, bad_before)
        batcher = MicroBatcher(self.layout, self.cfg.data.micro_batch_size, self.next_micro, self.keeper.on_bad,
                               self.manifest.path, self.split, known_bad=self.keeper.known)  # fmt: skip
        while True:
            # Planned one epoch at a time: every row found bad so far is skipped without decoding.
            plan = self.plan.table(epoch, offset, known=self._known(self.keeper.memory, epoch))
            ds = decode_dataset(
                [plan], self._opts, self.cfg, logical_cpus=not self.finite, reserved_cpus=self.reserved_cpus
            )
            batches = iter_batches_ending_gently(ds, batch_size=None, batch_format="pyarrow", prefetch_batches=2)
            with closing_iter(batches) as blocks:
                for table in blocks:
                    yield from batcher.add(table)
            if self.finite:
                yield from batcher.flush()
                return
            epoch, offset = epoch + 1, 0

    def next_step(self) -> list[dict[str, Any]]:
        """The micro-batches of the next optimizer step, in global order (fewer, then none, at the end of ``val``)."""
        if self._stream is None:
            self._stream = TimedIterator(self._driver_batches(), self.cfg.train.step_timeout_s, self.split)
        out = []
        for _ in range(self.micro_per_step):
            mb = next(self._stream, None)
            if mb is None:
                break
            out.append(mb.to_batch(self.layout))
        self.next_micro += len(out)
        return out

    def advance(self, steps: int = 1) -> None:
        """Record that ``steps`` optimizer steps were consumed by the rank streams."""
        self.next_micro += steps * self.micro_per_step

    # ----- per-rank streams
    def _rows_to_plan(self) -> int:
        cfg = self.cfg
        remaining = max(cfg.train.max_steps * cfg.data.global_batch_size - self.samples_consumed, 0)
        remaining += 2 * cfg.data.global_batch_size
        good_fraction = max(1.0 - cfg.data.max_bad_fraction, 0.1)
        return math.ceil(remaining / good_fraction) + len(self.manifest)

    def rank_streams(self, num_ranks: int) -> list[RankStream]:
        """One stream per encoder rank, starting where the driver is; rank ``r`` gets global micro-batches
        ``r, r + n, r + 2n, …`` of each step (identical to :meth:`next_step`'s).

        The plan covers ``train.max_steps`` (plus slack for bad rows) from here; streams are pulled by the actors
        directly (``streaming_split``), never through the driver. Rows known bad now are planned as known; rows found
        bad while streaming are skipped in later epochs through a shared :class:`BadRowRegistry` actor.
        """
        if self.finite:
            raise ValueError("rank_streams() serves the endless train split; use next_step() for val")
        if self.micro_per_step % num_ranks:
            raise ValueError(f"{self.micro_per_step} micro-batches per step do not split over {num_ranks} ranks")
        import ray

        epoch, offset, bad_before = self._locate()
        memory = self._memory()
        plans, rows, e, start = [], 0, epoch, offset
        need = self._rows_to_plan()
        while rows < need:
            plans.append(self.plan.table(e, start, known=self._known(memory, e)))
            rows += plans[-1].num_rows
            e, start = e + 1, 0
        ids = self.manifest.ids
        first_ids = [ids[r] for r in plans[0].column("row").to_pylist()] if plans else []
        registry = ray.remote(num_cpus=0)(BadRowRegistry).remote(memory.to_state(), memory.retry_epochs, epoch,
                                                                 first_ids)  # fmt: skip
        self._registries.append(registry)
        opts = replace(self._opts, registry=[registry])
        ds = decode_dataset(plans, opts, self.cfg, one_row_blocks=True, reserved_cpus=self.reserved_cpus)
        ds = ds.map_batches(
            _CollateFn,
            fn_constructor_kwargs={
                "layout": self.layout, "micro_batch_size": self.cfg.data.micro_batch_size,
                "start_index": self.next_micro, "qpath": str(self.quarantine_file), "manifest": self.manifest.path,
                "num_rows": len(self.manifest), "max_bad_fraction": self.cfg.data.max_bad_fraction,
                "epoch": epoch, "bad_before": bad_before, "memory": memory.to_state(),
                "retry_epochs": memory.retry_epochs,
            },  # fmt: skip
            batch_size=clips_per_task(len(self.manifest), self.cfg.data.num_decode_workers),
            batch_format="pyarrow",
            # One call at a time, in submission order: with several calls in flight the actor's worker threads
            # race for the UDF lock and a later batch can be collated first (seen in CI: "pos 0 after 3").
            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
            num_cpus=0,
            **pool_remote_args(decode_pool(self.cfg), COLLATE_POOL_SHARE),
        )
        shards = ds.streaming_split(num_ranks, equal=False)
        self._coordinators.append(getattr(shards[0], "_coord_actor", None))
        return [RankStream(shards[r], r, num_ranks, self.next_micro + r, self.layout) for r in range(num_ranks)]

    def close(self) -> None:
        """Stop decoding: close the driver's stream and the split coordinators."""
        import ray

        if self._stream is not None:
            self._stream.close()
            self._stream = None
        for actor in [*self._coordinators, *self._registries]:
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
        self._coordinators = []
        self._registries = []
