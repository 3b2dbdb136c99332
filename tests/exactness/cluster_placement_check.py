"""Run by test_cluster_placement.py in its own process: a simulated 3-node cluster (head, encoder node, LM node with
custom resources), the disaggregated runtime pinned to node types, and the C3 comparison against the fused model.
Prints one JSON line: node ids per group and the measured differences.
"""

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the tolerances module

import ray  # noqa: E402
import torch  # noqa: E402
from conftest import compare_runtimes  # noqa: E402  (this directory is sys.path[0] when run as a script)
from ray.cluster_utils import Cluster  # noqa: E402

from mimo_ray.parallel.megatron_setup import init_megatron  # noqa: E402

MiB = 1024 * 1024


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 96 * MiB, "include_dashboard": False},
    )
    try:
        enc_node = cluster.add_node(num_cpus=1, resources={"encoder_node": 2}, object_store_memory=96 * MiB)
        lm_node = cluster.add_node(num_cpus=1, resources={"lm_node": 2}, object_store_memory=96 * MiB)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        torch.set_num_threads(1)
        init_megatron(seed=1234)
        seen = {}

        def inspect(rt):
            seen["encoder"] = [loc.node_id for g in rt.encoder_groups for loc in g.locations(60)]
            seen["lm"] = [loc.node_id for loc in rt.lm_group.locations(60)]

        overrides = [
            "parallel.encoder_resources={encoder_node: 1}",
            "parallel.lm_resources={lm_node: 1}",
            "parallel.lm_tp=2",
        ]
        diffs = compare_runtimes(overrides, steps=5, inspect=inspect)
        result = {
            "encoder_node": enc_node.node_id,
            "lm_node": lm_node.node_id,
            "head_node": cluster.head_node.node_id,
            "placed": seen,
            "diffs": diffs,
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
