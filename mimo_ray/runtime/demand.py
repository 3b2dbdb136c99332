"""What the cluster is waiting for, and a bounded wait that tells waiting for resources from a hang.

Waiting for an autoscaler to bring a node is not a failure (NOTES §9): a step or a recovery that is slow because
tasks, actors or placement groups are still pending keeps waiting, under ``train.recovery_timeout_s``, while one
that is slow with nothing pending is a real failure.

    pending_demand()  # ["2 x {CPU: 1, cpu_decode: 1} (tasks/actors)", "1 x {lm_gpu: 1} (placement group PACK)"]
    results = get_waiting_for_resources(refs, step_timeout_s=120, resource_wait_s=1800, what="step 3")
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from mimo_ray.runtime.actor_group import get

log = logging.getLogger(__name__)


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def pending_demand() -> list[str]:
    """Resource requests the cluster has not placed yet (pending tasks, actors and placement groups), readable.

    Read from the GCS's autoscaling state (``ray.autoscaler.v2.sdk.get_cluster_status``), which a cluster without
    an autoscaler reports too. Demand of other jobs on a shared cluster counts as well: a step waiting behind it is
    waiting for resources just the same. Returns ``[]`` when the state cannot be read.
    """
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as err:  # noqa: BLE001 - an unreadable state means "no known demand", never a crash
        log.debug("cluster status unavailable: %s", err)
        return []
    demands = status.resource_demands
    out = []
    for pg in demands.placement_group_demand:
        for req in pg.bundles_by_count:
            out.append(f"{req.count} x {_fmt(req.bundle)} (placement group {pg.strategy})")
    for task in demands.ray_task_actor_demand:
        for req in task.bundles_by_count:
            out.append(f"{req.count} x {_fmt(req.bundle)} (tasks/actors)")
    return out


def get_waiting_for_resources(
    refs: list[ray.ObjectRef], step_timeout_s: float, resource_wait_s: float, what: str
) -> list[Any]:
    """:func:`~mimo_ray.runtime.actor_group.get` bounded by ``step_timeout_s`` while nothing is pending in the
    cluster, and by ``resource_wait_s`` in all while something is (an autoscaler starting a node, a decode pool
    still busy with a previous pipeline's tasks).

    Args:
        refs: the results to wait for.
        step_timeout_s: how long results may take with no resource demand pending (``train.step_timeout_s``).
        resource_wait_s: the longest wait in all while demand stays pending (``train.recovery_timeout_s``).
        what: what is waited for, for the log and the error (``step 3``).

    Raises:
        ray.exceptions.GetTimeoutError: not done within ``step_timeout_s`` with nothing pending, or within
            ``resource_wait_s`` with demand still pending; the message says which.
        ray.exceptions.RayError: the first failed result.
    """
    start = time.monotonic()
    while True:
        try:
            return get(refs, step_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            waited = time.monotonic() - start
            demand = pending_demand()
            if not demand:
                raise ray.exceptions.GetTimeoutError(
                    f"{what}: {err} (train.step_timeout_s) with no resource request pending in the cluster"
                ) from err
            if waited >= resource_wait_s:
                raise ray.exceptions.GetTimeoutError(
                    f"{what}: not done after {waited:.0f} s; the cluster still waits for {'; '.join(demand)} "
                    "(train.recovery_timeout_s)"
                ) from err
            log.warning(
                "%s not done after %.0f s: the cluster is waiting for %s; waiting on (up to %g s, "
                "train.recovery_timeout_s)", what, waited, "; ".join(demand), resource_wait_s,
            )  # fmt: skip
