"""How much of each resource a Ray cluster can ever hold: what its autoscaler may start, from the node types'
``max_workers`` in ``ray_cluster.yaml``. Data, runtime and driver read it so no request asks for more than that (a
request above it stays pending forever: "No available node types can fulfill resource requests ...").

    cluster_capacity()    # {"lm_gpu": 96.0, "cpu_decode": 256.0, "CPU": 1664.0, …}; None without an autoscaler
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def cluster_capacity() -> dict[str, float] | None:
    """The most of each resource: ``max_workers x per-node amount`` summed over the autoscaler config's node types.

    Returns:
        Resource name → amount, or ``None`` on a cluster without an autoscaler config (a local or fixed cluster:
        its current resources are all it has).
    """
    try:
        from ray._private.state import state  # the GCS copy of the autoscaler's config (no public API in 2.60)

        found = state.get_max_resources_from_cluster_config()
    except Exception as err:  # noqa: BLE001 - unreadable config means "unknown capacity", never a crash
        log.debug("autoscaler config unavailable: %s", err)
        return None
    return {k: float(v) for k, v in found.items()} if found else None
