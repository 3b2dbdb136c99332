"""Embedding hand-off between two stage-like Ray actors versus a same-size copy in one process, and the control
latency of a tiny actor call (``jobs/bench.py transport``).

One hand-off is ``consumer.consume(producer.produce())`` chained by an ObjectRef (the runtime's pattern, the driver
only waits): the producer returns a prepared payload, the consumer receives it and returns its size. CPU paths go
through the object store: numpy (what the runtime ships, zero-copy on read), torch tensors (pickled copies) and
torch tensors with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in the producer. On a GPU machine the same hand-off
also runs over Ray Direct Transport (``tensor_transport="cuda_ipc"`` between two actors sharing GPU 0, ``"nccl"``
between two GPUs when there are two) against an on-GPU copy.

    table = transport_table([16, 64, 256], repeats=10, warmup=2, timeout_s=120)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from mimo_ray.perf.host import copy_timing
from mimo_ray.perf.report import Table, ratio
from mimo_ray.perf.timing import Timing, time_calls

MIB = 1 << 20
ZERO_COPY_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
#: Logical CPUs per benchmark actor (fractional: never starves anything else on a small box, NOTES §3).
ACTOR_CPUS = 0.25


class Endpoint:
    """A stage-like actor that holds one payload and hands it over, or receives one.

    A plain class; :func:`make_endpoint` wraps it with ``ray.remote``.
    """

    def __init__(self) -> None:
        self._payload: Any = None

    def ping(self, *_: Any) -> int:
        """A tiny call (its arguments, if refs, are resolved first: the chained-latency probe)."""
        return 0

    def prepare(self, nbytes: int, kind: str) -> int:
        """Build the payload once: ``numpy``, ``torch`` (CPU) or ``cuda`` float32 of ``nbytes`` bytes."""
        count = nbytes // 4
        if kind == "numpy":
            self._payload = np.ones(count, dtype=np.float32)
        elif kind == "torch":
            self._payload = torch.ones(count, dtype=torch.float32)
        elif kind == "cuda":
            self._payload = torch.ones(count, dtype=torch.float32, device="cuda")
            torch.cuda.synchronize()
        else:
            raise ValueError(f"unknown payload kind {kind!r}; choose numpy, torch or cuda")
        return nbytes

    def produce(self) -> Any:
        """The prepared payload (Ray stores or transports it as the call's result)."""
        return self._payload

    def consume(self, payload: Any) -> int:
        """Receive a payload (already resolved by Ray); returns its size in bytes."""
        if isinstance(payload, torch.Tensor):
            if payload.is_cuda:
                torch.cuda.synchronize()
            return payload.numel() * payload.element_size()
        return int(payload.nbytes)


def make_endpoint(*, env: dict[str, str] | None = None, num_gpus: float = 0.0, tensor_transport: bool = False) -> Any:
    """Start one :class:`Endpoint` actor (fractional CPU; optional env vars, GPU share, Ray Direct Transport)."""
    cls = ray.remote(enable_tensor_transport=True)(Endpoint) if tensor_transport else ray.remote(Endpoint)
    options: dict[str, Any] = {"num_cpus": ACTOR_CPUS, "num_gpus": num_gpus, "max_restarts": 0}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return cls.options(**options).remote()


def handoff_timing(
    producer: Any, consumer: Any, nbytes: int, kind: str, repeats: int, warmup: int, timeout_s: float,
    tensor_transport: str | None = None,
) -> Timing:  # fmt: skip
    """Time ``consumer.consume(producer.produce())`` for a ``nbytes`` payload of ``kind``.

    Args:
        producer: an :class:`Endpoint` actor.
        consumer: another :class:`Endpoint` actor.
        nbytes: payload size.
        kind: ``numpy``, ``torch`` or ``cuda``.
        repeats: timed hand-offs.
        warmup: untimed hand-offs first.
        timeout_s: bound of every wait.
        tensor_transport: Ray Direct Transport backend for the produced tensor (``None``: object store).
    """
    ray.get(producer.prepare.remote(nbytes, kind), timeout=timeout_s)
    produce = producer.produce.options(tensor_transport=tensor_transport) if tensor_transport else producer.produce

    def once() -> None:
        got = ray.get(consumer.consume.remote(produce.remote()), timeout=timeout_s)
        if got != nbytes:
            raise RuntimeError(f"consumer received {got} bytes, expected {nbytes}")

    timing = time_calls(once, repeats, warmup)
    ray.get(producer.prepare.remote(4, "numpy"), timeout=timeout_s)  # free the big payload
    return timing


def _row(table: Table, path: str, nbytes: int, timing: Timing, base: Timing | None) -> None:
    gbps = nbytes / timing.median / 1e9
    base_gbps = nbytes / base.median / 1e9 if base is not None else None
    table.add([path, nbytes // MIB, timing.median * 1e3, timing.p90 * 1e3, gbps, ratio(gbps, base_gbps)])
    table.extra.setdefault("timings", {})[f"{path}@{nbytes // MIB}MiB"] = timing.to_dict()


def _kill(actors: Sequence[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _latency_rows(table: Table, producer: Any, consumer: Any, repeats: int, warmup: int, timeout_s: float) -> None:
    """Tiny-call round trips: driver → actor, and two calls chained actor → actor (the runtime's pattern)."""
    lat_repeats = max(repeats, 50)
    direct = time_calls(lambda: ray.get(producer.ping.remote(), timeout=timeout_s), lat_repeats, warmup + 5)
    chained = time_calls(
        lambda: ray.get(consumer.ping.remote(producer.ping.remote()), timeout=timeout_s), lat_repeats, warmup + 5
    )
    for name, timing in (("tiny call driver->actor", direct), ("2 chained calls actor->actor", chained)):
        table.add([name, 0, timing.median * 1e3, timing.p90 * 1e3, None, None])
        table.extra.setdefault("timings", {})[name] = timing.to_dict()


def _warm_object_store(producer: Any, consumer: Any, nbytes: int, timeout_s: float) -> None:
    """Cycle hand-offs through the whole object store twice: its shared memory is faulted in (and zeroed) on first
    touch, which otherwise slows the first ~store/size hand-offs of whatever is measured first (steady state of a
    training job is a warm store).
    """
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    calls = min(2 * int(store // nbytes) + 4, 256)
    handoff_timing(producer, consumer, nbytes, "numpy", 1, calls, timeout_s)


def _cpu_rows(table: Table, sizes: list[int], repeats: int, warmup: int, timeout_s: float,
             threads: int | None) -> list[Any]:  # fmt: skip
    producer, producer_zc, consumer = make_endpoint(), make_endpoint(env={ZERO_COPY_ENV: "1"}), make_endpoint()
    actors = [producer, producer_zc, consumer]
    ray.get([a.ping.remote() for a in actors], timeout=timeout_s)
    _latency_rows(table, producer, consumer, repeats, warmup, timeout_s)
    for sender in (producer, producer_zc):
        _warm_object_store(sender, consumer, min(sizes), timeout_s)
    for nbytes in sizes:
        base = copy_timing(nbytes, repeats, warmup, threads=threads)
        _row(table, "host memcpy (copy_ into a preallocated tensor)", nbytes, base, base)
        fresh = copy_timing(nbytes, repeats, warmup, threads=threads, fresh=True)
        _row(table, "host torch clone (fresh allocation)", nbytes, fresh, base)
        for path, actor, kind in (
            ("object store, numpy (runtime path)", producer, "numpy"),
            ("object store, torch (pickled)", producer, "torch"),
            ("object store, torch zero-copy flag", producer_zc, "torch"),
        ):
            _row(table, path, nbytes, handoff_timing(actor, consumer, nbytes, kind, repeats, warmup, timeout_s), base)
    return actors


def _gpu_rows(table: Table, sizes: list[int], repeats: int, warmup: int, timeout_s: float) -> list[Any]:
    """CUDA IPC between two actors on GPU 0 and NCCL between two GPUs (when present) vs an on-GPU copy."""
    actors: list[Any] = []
    pairs = [("RDT cuda_ipc (shared GPU)", "cuda_ipc", 0.5)]
    if torch.cuda.device_count() >= 2:
        pairs.append(("RDT nccl (two GPUs)", "nccl", 1.0))
    for path, backend, share in pairs:
        producer = make_endpoint(num_gpus=share, tensor_transport=True)
        consumer = make_endpoint(num_gpus=share, tensor_transport=True)
        actors += [producer, consumer]
        if backend == "nccl":
            from ray.experimental.collective import create_collective_group

            create_collective_group([producer, consumer], backend="nccl")
        for nbytes in sizes:
            base = copy_timing(nbytes, repeats, warmup, device="cuda")
            if backend == "cuda_ipc":
                _row(table, "device memcpy (D2D copy_ into a preallocated tensor)", nbytes, base, base)
            timing = handoff_timing(producer, consumer, nbytes, "cuda", repeats, warmup, timeout_s, backend)
            _row(table, path, nbytes, timing, base)
    return actors


def transport_table(
    sizes_mib: Sequence[int], repeats: int, warmup: int, timeout_s: float, threads: int | None = None
) -> Table:
    """Measure every hand-off path available here for each size, plus the control latency rows.

    Args:
        sizes_mib: payload sizes in MiB.
        repeats: timed hand-offs per path and size.
        warmup: untimed hand-offs first.
        timeout_s: bound of every wait on an actor.
        threads: torch threads of the in-process host copy (``None``: the process's current setting).

    Returns:
        Columns ``path, MiB, median ms, p90 ms, GB/s, vs memcpy`` (GB/s relative to the same-size in-process copy
        of the same device).
    """
    table = Table(
        "transport",
        "Embedding hand-off between two actors vs an in-process copy",
        ["path", "MiB", "median ms", "p90 ms", "GB/s", "vs memcpy"],
    )
    sizes = [int(s) * MIB for s in sizes_mib]
    actors: list[Any] = []
    try:
        actors += _cpu_rows(table, sizes, repeats, warmup, timeout_s, threads)
        if torch.cuda.is_available():
            actors += _gpu_rows(table, sizes, repeats, warmup, timeout_s)
    finally:
        _kill(actors)
    table.notes += [
        "hand-off = consumer.consume(producer.produce()) chained by an ObjectRef, timed from the driver: includes "
        "two actor calls (see the latency rows) and the producer's copy into the object store",
        "GB/s = payload bytes / median time; 'vs memcpy' = that over the same-size in-process copy_ into a "
        f"preallocated tensor ({threads or torch.get_num_threads()} torch threads); a clone into fresh memory also "
        "pays the page faults of the new allocation",
    ]
    if not torch.cuda.is_available():
        table.notes.append("no CUDA here: the CUDA IPC / NCCL (Ray Direct Transport) rows did not run")
    return table
