"""An autoscaling Ray cluster on one machine, built from the real ``ray_cluster.yaml`` (NOTES §9).

Ray's fake multi-node provider starts real raylets on this machine as the "nodes" the autoscaler launches, with any
resources (GPU counts included). Never ``ray.cluster_utils.AutoscalingCluster`` (broken in the 2.60 wheel, and its
shutdown runs ``ray stop --force``, which kills every Ray on the host): this module starts ``ray start --head
--autoscaling-config`` itself, on free ports and its own ``--temp-dir``, and stops only the processes it started.

    with FakeCluster(tmp_path) as cluster:                  # head up, autoscaler running
        cluster.nodes()                                     # {node_id: NodeInfo(pool, alive)}
        cluster.kill_node(node_id)                          # SIGKILL every process of that fake node
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from mimo_ray.parallel.megatron_setup import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MiB = 1024 * 1024
#: The fake provider's name for the head type (required by it).
HEAD_TYPE = "ray.head.default"
#: Worker pools of ray_cluster.yaml, each exposing a custom resource of its own name.
POOLS = ("cpu_decode", "encoder_gpu", "lm_gpu")
#: What a 2-core test machine can hold: logical CPUs per node, workers per pool, object store per node.
TEST_CPUS = 2
TEST_MAX_WORKERS = {"cpu_decode": 1, "encoder_gpu": 1, "lm_gpu": 2}
TEST_OBJECT_STORE = 128 * MiB


def fake_config(source: Path, gcs_address: str, idle_timeout_minutes: float) -> dict[str, Any]:
    """``ray_cluster.yaml`` for the fake multi-node provider.

    Same worker node types, custom resources (and GPU counts), labels and ``min_workers``; logical CPUs (and the
    ``cpu_decode`` resource that equals them) cut to :data:`TEST_CPUS`, ``max_workers`` to :data:`TEST_MAX_WORKERS`
    and a small object store so the nodes fit a 2-core box; provider, auth, file mounts and setup/start commands
    replaced (nothing to install: every fake node runs this checkout).
    """
    raw = yaml.safe_load(source.read_text())
    head = raw["available_node_types"][raw["head_node_type"]]
    types: dict[str, Any] = {
        HEAD_TYPE: {"resources": dict(head["resources"]), "node_config": {}, "min_workers": 0, "max_workers": 0}
    }
    for name, node in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        resources = copy.deepcopy(node["resources"])
        cpus = resources["CPU"]
        resources["CPU"] = min(cpus, TEST_CPUS)
        for key, amount in resources.items():  # a resource that mirrors the CPU count keeps mirroring it
            if key not in ("CPU", "GPU") and amount == cpus:
                resources[key] = resources["CPU"]
        resources["object_store_memory"] = TEST_OBJECT_STORE
        types[name] = {
            "resources": resources,
            "labels": dict(node.get("labels", {})),
            "node_config": {},
            "min_workers": node["min_workers"],
            "max_workers": min(node["max_workers"], TEST_MAX_WORKERS.get(name, 1)),
        }
    return {
        "cluster_name": raw["cluster_name"],
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": raw["upscaling_speed"],
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            # The fake provider loaded as an external one: the v2 autoscaler fills in a built-in provider's defaults
            # from fake_multi_node/example.yaml, which the 2.60 wheel does not ship.
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "gcs_address": gcs_address,
            # Autoscaler v2 (what these two serve) replaces a node whose raylet died; v1 never does with this
            # provider (its nodes keep the "uninitialized" status tag, so v1's liveness check skips them).
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class NodeInfo:
    """A node as the state API reports it: its pool (``head`` or the pool's custom resource) and liveness."""

    pool: str
    alive: bool


def _pool_of(resources: dict[str, float], is_head: bool) -> str:
    if is_head:
        return "head"
    found = [p for p in POOLS if resources.get(p)]
    return found[0] if len(found) == 1 else f"unknown{sorted(resources)}"


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (depth first)."""
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


class FakeCluster:
    """``ray start --head --autoscaling-config`` of :func:`fake_config`, its dashboard (job API) on a free port.

    Args:
        workdir: where the config goes; the head's ``--temp-dir`` is a fresh folder under ``/tmp`` (Ray's socket
            paths must stay short).
        idle_timeout_minutes: how long an idle worker lives before the autoscaler removes it.
        heartbeat_timeout_s: how soon the autoscaler replaces a node that stopped reporting.
    """

    def __init__(self, workdir: Path, idle_timeout_minutes: float = 0.1, heartbeat_timeout_s: int = 10) -> None:
        self.workdir = workdir
        self.gcs_port = free_port()
        self.dash_port = free_port()
        self.temp_dir = Path("/tmp") / f"ray_fake_{self.gcs_port}"
        import ray

        ip = ray.util.get_node_ip_address()
        self.config = fake_config(ROOT / "ray_cluster.yaml", f"{ip}:{self.gcs_port}", idle_timeout_minutes)
        self.config_path = workdir / "fake_cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.head: subprocess.Popen | None = None
        self._seen: dict[str, NodeInfo] = {}

    def env(self) -> dict[str, str]:
        """Environment of ``ray start`` (inherited by the autoscaler, every fake node and every job)."""
        env = dict(os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is the one on the head's PATH
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="disabled",
            RAY_FAKE_CLUSTER="1",
            RAY_enable_autoscaler_v2="1",
            RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            # `ray start` gives the dashboard (the job API) 60 s by default; a starved 2-core box can need more.
            RAY_DASHBOARD_STARTUP_TIMEOUT_S="240",
            AUTOSCALER_HEARTBEAT_TIMEOUT_S=str(self.heartbeat_timeout_s),
            # A killed node is declared dead in a few seconds (defaults: ~15-30 s).
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="5",
        )
        for key in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):  # "" breaks fake GPU nodes (NOTES §9)
            env.pop(key, None)
        return env

    def start(self, timeout_s: float = 300, attempts: int = 2) -> None:
        """Start the head (``ray start --head --block`` with the autoscaler) and wait for its job API.

        A head that exits before it answers (on a starved box Ray's own dashboard start-up can fail) is stopped
        (every process of this cluster) and started once more; the error carries the last attempt's log.
        """
        for attempt in range(1, attempts + 1):
            if self._start_once(timeout_s):
                return
            tail = self.log_tail()
            self.stop()
            if attempt == attempts:
                raise RuntimeError(f"fake cluster head did not come up ({attempts} attempts): {tail}")
            time.sleep(5)

    def _start_once(self, timeout_s: float) -> bool:
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dash_port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        head_cpus = self.config["available_node_types"][HEAD_TYPE]["resources"].get("CPU", 0)
        cmd = [str(BIN / "ray"), "start", "--head", "--block", *(f"{k}={v}" for k, v in ports.items()),
               f"--autoscaling-config={self.config_path}", f"--num-cpus={head_cpus}",
               f"--object-store-memory={TEST_OBJECT_STORE}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]  # fmt: skip
        log = (self.workdir / "ray_start.log").open("w")
        self.head = subprocess.Popen(cmd, env=self.env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.address + "/api/version", timeout=2):
                    return True
            except OSError:
                if self.head.poll() is not None or time.monotonic() > deadline:
                    return False
                time.sleep(1)

    def log_tail(self, chars: int = 3000) -> str:
        parts = [(self.workdir / "ray_start.log").read_text()[-chars:]]
        for name in ("monitor.log", "raylet.out"):  # the head raylet dies on a starved box ("Check failed")
            found = sorted(self.temp_dir.glob(f"session_*/logs/{name}"))
            if found:
                parts.append(f"--- {name}\n" + found[-1].read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    # ----- state
    def nodes(self) -> dict[str, NodeInfo]:
        """Every node seen so far (dead ones keep their pool), refreshed from the state API."""
        from ray.util.state import list_nodes

        for node in list_nodes(address=self.address, limit=1000, raise_on_missing_output=False, timeout=30):
            pool = _pool_of(node.resources_total or {}, node.is_head_node)
            if node.node_id not in self._seen or not pool.startswith("unknown"):
                self._seen[node.node_id] = NodeInfo(pool, node.state == "ALIVE")
            else:
                self._seen[node.node_id].alive = node.state == "ALIVE"
        return dict(self._seen)

    def alive_pools(self) -> dict[str, int]:
        """Live nodes per pool."""
        counts: dict[str, int] = {}
        for info in self.nodes().values():
            if info.alive:
                counts[info.pool] = counts.get(info.pool, 0) + 1
        return counts

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of fake node ``node_id`` (its raylet, agents and workers) at once.

        The fake provider gives each node's processes ``RAY_OVERRIDE_NODE_ID_FOR_TESTING=<node id>``; only
        descendants of this cluster's head are searched.
        """
        pids = [p for p in descendants(self.head.pid) if _environ(p).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def holders(self) -> str:
        """What the autoscaler sees (``ray status -v``: usage and idle time per node) and what still holds
        resources (live actors, placement groups not removed): for a failure message when a node does not go."""
        from ray.util.state import list_actors, list_placement_groups

        gcs = self.config["provider"]["gcs_address"]
        status = subprocess.run([str(BIN / "ray"), "status", "-v", f"--address={gcs}"], env=self.env(),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        parts = [f"--- ray status -v\n{status.stdout[-4000:]}{status.stderr[-1000:]}"]
        try:
            actors = list_actors(address=self.address, filters=[("state", "!=", "DEAD")], limit=1000, timeout=30,
                                 raise_on_missing_output=False, detail=True)  # fmt: skip
            pgs = list_placement_groups(address=self.address, filters=[("state", "!=", "REMOVED")], limit=1000,
                                        timeout=30, raise_on_missing_output=False, detail=True)  # fmt: skip
            parts.append("--- live actors\n" + dumps([(a.name, a.class_name, a.node_id, a.state) for a in actors]))
            parts.append("--- placement groups\n" + dumps([(g.name, g.state, g.bundles) for g in pgs]))
        except Exception as err:  # noqa: BLE001 - diagnostics only
            parts.append(f"--- state API failed: {err}")
        return "\n".join(parts)

    # ----- teardown
    def stop(self) -> None:
        """End the head's process group, then every remaining process of this cluster (found by ancestry and by
        this cluster's own temp dir), never anything else."""
        if self.head is None:
            return
        tree = descendants(self.head.pid)
        try:
            os.killpg(self.head.pid, signal.SIGTERM)
            self.head.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in [self.head.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["pkill", "-KILL", "-f", str(self.temp_dir)], check=False)
        self.head = None

    def leftover(self) -> list[str]:
        """Command lines of processes still running that belong to this cluster (by temp dir)."""
        found = subprocess.run(["pgrep", "-af", str(self.temp_dir)], capture_output=True, text=True).stdout
        return [line for line in found.splitlines() if "pgrep" not in line]

    def __enter__(self) -> FakeCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def job_events(address: str, job_id: str) -> dict[str, Any]:
    """Where a job's actors and tasks ran: ``{"actors": [(name, class, node_id)], "tasks": [(name, node_id)]}``."""
    from ray.util.state import list_actors, list_tasks

    actors = list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10000, timeout=60,
                         raise_on_missing_output=False, detail=True)  # fmt: skip
    tasks = list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10000, timeout=60,
                       raise_on_missing_output=False, detail=True)  # fmt: skip
    return {
        "actors": [(a.name or "", a.class_name, a.node_id, a.required_resources) for a in actors],
        "tasks": [(t.name, t.node_id, t.type, t.required_resources) for t in tasks],
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
