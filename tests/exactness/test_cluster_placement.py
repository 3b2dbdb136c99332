"""Placement on a simulated multi-node cluster (ray.cluster_utils.Cluster), in a subprocess so the session's local
Ray instance is left alone: every actor lands on its node type and the step still equals the fused model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("cluster_placement_check.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_actors_land_on_their_node_types_and_step_is_exact(report):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["placed"]["encoder"] == [result["encoder_node"]]
    assert result["placed"]["lm"] == [result["lm_node"]] * 2
    assert result["head_node"] not in result["placed"]["encoder"] + result["placed"]["lm"]
    diffs = result["diffs"]
    report("cluster_placement", diffs)
    assert diffs["loss1"] <= 1e-5 and diffs["grads1"] <= 1e-5  # LM TP=2 on the LM node
    assert diffs["loss_traj"] <= 1e-6
