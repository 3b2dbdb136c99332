"""Ray Data helpers of the decode pipelines: the decode pool, the CPU budget, the dataset context and the decode
dataset of plan tables (used by the training/validation pipeline and by inference prompt batches).

The CPUs the stage actors hold are passed in as a value (``reserved_cpus``) by the layer that places them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from mimo_ray.capacity import cluster_capacity
from mimo_ray.data.epoch_plan import PLAN_SCHEMA
from mimo_ray.data.prepare import DecodeOptions, decode_batch

#: Most clips one decode task takes (NOTES §4: ~15 per task amortises task overhead).
MAX_CLIPS_PER_TASK = 15
#: ``ray_cluster.yaml``'s decode pool and the custom resource its nodes expose (same name).
DECODE_POOL = "cpu_decode"
#: How much of the pool resource the collate actor holds (a token amount: it only pins the actor to the pool).
COLLATE_POOL_SHARE = 0.01


@contextmanager
def closing_iter(iterable: Any) -> Iterator[Iterator[Any]]:
    """An iterator over a Ray Data iterable (``ds.iter_batches(...)``, ``ds.iter_rows()``) that is closed on exit.

    Ray Data hands out an iterable whose ``__iter__`` makes a fresh generator; a ``for`` loop that stops early leaves
    that generator to the garbage collector, whose finaliser may then touch Ray after ``ray.shutdown()``, and the
    core worker ends the whole process (exit 1, "The core worker has already been shutdown"). Closing it here runs
    Ray Data's clean-up while Ray is still up.
    """
    it = iter(iterable)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def iter_batches_ending_gently(ds: Any, **kwargs: Any) -> Any:
    """``ds.iter_batches(**kwargs)`` whose early end (a ``break``, :func:`closing_iter`) stops the dataset's executor
    without force.

    Ray Data's own iterator ends an unfinished iteration with ``executor.shutdown(force=True)``, which force-cancels
    the running tasks; in Ray 2.60 a force-cancel that races with the task's own reply aborts the calling process in
    the core worker (``task_manager.cc: Check failed: it != submissible_tasks_.end()``: the whole test session
    died on it once in five suite runs; the driver of a training or inference job would die the same way). A shutdown
    without force cancels them gently (the task sees ``KeyboardInterrupt``), which takes the other path. Only the
    driver-side iterators made here change; streaming_split shards end through their coordinator actor.
    """
    return _gentle_end_iterator_class()(ds).iter_batches(**kwargs)


@functools.cache
def _gentle_end_iterator_class() -> type:
    """Ray Data's plain dataset iterator with a shutdown without force at an early end (made once, on first use:
    importing Ray Data here would load it into every process that imports this module).
    """
    from ray.data._internal.iterator.iterator_impl import DataIteratorImpl

    class GentleEndIterator(DataIteratorImpl):
        def _on_iteration_end(self, executor: Any) -> None:
            if executor is not None:
                executor.shutdown(force=False)

    return GentleEndIterator


def settle_ray_data_threads(timeout_s: float = 30.0) -> list[str]:
    """Collect dropped iterators and wait (bounded) for Ray Data's iterator threads (``iter_threaded``) to end.

    Call before ``ray.shutdown()``: such a thread still fetching a block after the shutdown makes the core worker end
    the whole process (exit 1, "The core worker has already been shutdown").

    Returns:
        The names of the threads still alive at the deadline (none normally).
    """
    import gc
    import threading
    import time

    gc.collect()  # finalise dropped Ray Data iterators while Ray is up; their finalisers stop their threads
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [t for t in threading.enumerate() if t.name.startswith("iter_threaded") and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return [t.name for t in alive]
        alive[0].join(timeout=0.1)


def clips_per_task(num_rows: int, workers: int) -> int:
    """Clips per decode task: up to :data:`MAX_CLIPS_PER_TASK`, fewer so small sets still use every worker."""
    return max(1, min(MAX_CLIPS_PER_TASK, math.ceil(num_rows / (4 * workers))))


def decode_pool(cfg: Any) -> str | None:
    """The custom resource decode work asks for, or ``None`` to run anywhere.

    ``parallel.decode_resource``: ``auto`` → :data:`DECODE_POOL` when the cluster has it; ``none`` → never; any other
    name → always (an autoscaler starts the pool's nodes for the pending tasks).
    """
    name = cfg.parallel.decode_resource
    if name == "none":
        return None
    if name != "auto":
        return name
    import ray

    return DECODE_POOL if ray.cluster_resources().get(DECODE_POOL, 0.0) > 0 else None


def pool_remote_args(pool: str | None, amount: float) -> dict[str, Any]:
    """Ray remote arguments that pin a task or actor to the decode pool (``{}`` when there is none)."""
    return {"resources": {pool: amount}} if pool else {}


def decode_resources(cfg: Any, pool: str | None = None, reserved_cpus: float = 0.0) -> tuple[float, float]:
    """``(CPU budget for Ray Data, CPUs per decode task)``.

    With a decode ``pool`` the budget is the pool's resource (the stage actors live elsewhere); a pool that has no
    node yet gets one slot per decode worker, which the autoscaler then provides. The tasks' share leaves room for
    the collate actor's :data:`COLLATE_POOL_SHARE`, so all ``data.num_decode_workers`` tasks run at once.
    ``reserved_cpus`` are the logical CPUs the stage actors hold
    (``mimo_ray.runtime.placement.stage_cpu_reservation``), set aside from the budget.

    Raises:
        RuntimeError: no CPU is left for decoding once the stage actors' share is set aside.
    """
    import ray

    workers = cfg.data.num_decode_workers
    if pool is not None:
        budget = float(ray.cluster_resources().get(pool, 0.0)) or float(workers)
        # Never ask for more of the pool than the autoscaler may ever start (its max_workers): such a request stays
        # pending forever ("No available node types can fulfill ...").
        most = (cluster_capacity() or {}).get(pool)
        if most:
            budget = min(budget, most)
        # The collate actor holds COLLATE_POOL_SHARE of the pool too: leave it room, or one decode task fewer runs
        # (2 workers x 1.0 + 0.01 on a 2-slot node: one task at a time, seen on the fake cluster).
        slots = budget - COLLATE_POOL_SHARE
        return budget, max(min(1.0, math.floor(100 * slots / workers) / 100), 0.01)
    total = float(ray.cluster_resources().get("CPU", 0.0))
    reserved = float(reserved_cpus)
    budget = total - reserved
    if budget < 0.05:
        raise RuntimeError(
            f"no CPU left for data decoding: the cluster has {total:g} CPUs and the stage actors reserve "
            f"{reserved:g} (parallel.cpus_per_actor x actors); lower parallel.cpus_per_actor or add CPUs"
        )
    workers = cfg.data.num_decode_workers
    per_task = min(1.0, math.floor(100 * budget / workers) / 100)
    return budget, max(per_task, 0.01)


def configure_context(ctx: Any, cpu_budget: float, one_row_blocks: bool = False) -> None:
    """The pipeline's own Ray Data settings (on the dataset's context, not the global one)."""
    from ray.data import ExecutionResources

    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ExecutionResources(cpu=cpu_budget)
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if one_row_blocks:
        # One micro-batch per block: streaming_split then deals blocks out round-robin (rank r gets r, r+n, …).
        ctx.target_max_block_size = 1


def decode_dataset(
    plans: list[pa.Table],
    opts: DecodeOptions,
    cfg: Any,
    one_row_blocks: bool = False,
    logical_cpus: bool = True,
    reserved_cpus: float = 0.0,
) -> Any:
    """Ray Data dataset of decoded rows (:data:`~mimo_ray.data.collate.DECODED_SCHEMA`) for the plan tables.

    Args:
        plans: plan tables, decoded in this order.
        opts: decode options.
        cfg: config (``data.num_decode_workers``, stage reservations).
        one_row_blocks: one row per block (the per-rank streams need it).
        logical_cpus: decode tasks hold logical CPUs. ``False`` (evaluation during training) asks for none: a paused
            training pipeline keeps its decode tasks (blocked on generator backpressure) and their CPUs, and an eval
            pipeline that waits for those CPUs stalls for minutes (measured); blocked tasks use no real CPU.
        reserved_cpus: logical CPUs the stage actors hold, kept out of the decode budget.
    """
    import ray

    pool = decode_pool(cfg)
    budget, per_task = decode_resources(cfg, pool, reserved_cpus)
    if not logical_cpus:
        per_task = 0
    plan = pa.concat_tables(plans) if plans else PLAN_SCHEMA.empty_table()
    workers = cfg.data.num_decode_workers
    step = clips_per_task(plan.num_rows, workers)
    blocks = [plan.slice(i, step) for i in range(0, plan.num_rows, step)] or [plan]
    # from_blocks reads block metadata here; from_arrow runs a 1-CPU task per block wherever Ray likes, which on an
    # autoscaling cluster is demand that starts a stage pool's node for nothing (seen on the fake cluster).
    ds = ray.data.from_blocks(blocks)
    configure_context(ds.context, budget, one_row_blocks)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"opts": opts},
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=workers),
        num_cpus=per_task,
        **pool_remote_args(pool, per_task or COLLATE_POOL_SHARE),
    )


def ensure_ray(cfg: Any) -> None:
    """Start Ray with ``cluster.*`` settings unless it is already running."""
    import ray

    if not ray.is_initialized():
        ray.init(**cfg.cluster.init_kwargs())
