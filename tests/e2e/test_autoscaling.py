"""`ray_cluster.yaml` for real: an autoscaling cluster made from it (Ray's fake multi-node provider, NOTES §9), and
`jobs/train.py` submitted with the `ray job submit` command line (and watched with the SDK client).

One cluster, one job (the cluster and the job are the slowest part of the suite, so one job checks all of this):
the pools scale up for the stage placement groups and decode tasks, every actor and decode task runs on its pool (the
LM's TP=2 group on the LM node, the encoder on the encoder node, collate and decode on the decode node, nothing on
the head); after the first checkpoint the LM node is killed: the autoscaler replaces it, the driver's recovery waits
for the new node and rebuilds the groups from the latest checkpoint, the final loss equals an uninterrupted run's
(the fused runtime in the test process, within LOSS_RTOL), and the idle GPU pools scale down after the job. The step
exactness of each layout on one node is tests/exactness (C3); here the layout spans nodes.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_cluster import FakeCluster, dumps, job_events
from tolerances import LOSS_RTOL

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
STEPS = 6
#: Bounds (generous: 2 shared cores) for one job, for a node to appear and for idle nodes to go.
JOB_TIMEOUT_S = 420
SCALE_DOWN_TIMEOUT_S = 120
GPU_POOLS = ("encoder_gpu", "lm_gpu")


def _make_data(root: Path, module) -> Path:
    module.make_synthetic(root, 16, seconds=2.0, fps=8, size=(32, 32), seed=5, val_fraction=0.0)
    return root / "train.jsonl"


def _entrypoint(data: Path, out: Path) -> str:
    """``python jobs/train.py ...`` as a user submits it (``python`` is the job's own interpreter on the cluster)."""
    flags = [
        "--preset tiny", f"--max-steps {STEPS}", f"--output-dir {out}", f"--data-path {data}",
        "'parallel.encoder_resources={encoder_gpu: 1}'", "'parallel.lm_resources={lm_gpu: 1}'",
        "parallel.decode_resource=cpu_decode", "parallel.placement_timeout_s=240", "train.ckpt_interval=1",
        "train.step_timeout_s=120", "train.recovery_timeout_s=600", "train.max_failures=2", "data.num_decode_workers=2",
        "parallel.lm_tp=2",  # a TP group of two actors on the LM pool's node, gloo between them
    ]  # fmt: skip
    return f"python {ROOT / 'jobs' / 'train.py'} " + " ".join(flags)


def _cli_submit(cluster: FakeCluster, entrypoint: str) -> str:
    """``ray job submit --no-wait -- <entrypoint>`` from the checkout, as a user does; the submission id.

    Without ``--working-dir``: the fake nodes share one machine and one session folder, so each node's runtime-env
    agent unpacks the job's package into the same directory, and one node re-unpacking it while the driver imports
    from it was seen to hide modules ("No module named 'mimo_ray.driver.train_loop'"). A real cluster has a disk per
    node; what ``--working-dir .`` uploads is checked in tests/unit/test_job_package.py.
    """
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.address, "--no-wait", "--",
         *shlex.split(entrypoint)],
        cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    found = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"ray job submit failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
    return found.group(0)


class Job:
    """A job submitted with the ``ray job submit`` command line and watched with the SDK ``client``: node ids per
    pool seen while it runs, when each pool first had a live node."""

    def __init__(self, cluster: FakeCluster, client, entrypoint: str):
        self.cluster = cluster
        self.client = client
        self.t_submit = time.monotonic()
        deadline = self.t_submit + 180
        while True:  # the job agent can come up many seconds after the dashboard answers (a loaded box)
            try:
                self.submission_id = _cli_submit(cluster, entrypoint)
                self.t_submit = time.monotonic()  # times below count from the accepted submission
                break
            except (RuntimeError, OSError) as err:  # "No available agent", or the request dropped meanwhile
                if time.monotonic() > deadline or cluster.head.poll() is not None:
                    raise RuntimeError(f"job submission failed: {err}\n{cluster.log_tail()}") from err
                print(f"submit retry: {type(err).__name__}: {str(err)[:120]}", flush=True)
                time.sleep(2)
        self.first_alive: dict[str, float] = {}

    def poll_nodes(self) -> None:
        for pool, count in self.cluster.alive_pools().items():
            if count and pool not in self.first_alive:
                self.first_alive[pool] = time.monotonic() - self.t_submit

    def wait(self, until=None, timeout_s: float = JOB_TIMEOUT_S):
        """Poll until the job ends (or ``until()`` is true); returns the status."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until is not None and until():
                return None
            status = self.client.get_job_status(self.submission_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                self.t_end = time.monotonic()
                return status
            self.poll_nodes()
            time.sleep(0.2)
        self.client.stop_job(self.submission_id)
        pytest.fail(f"job {self.submission_id} not done in {timeout_s} s:\n{self.logs()}")

    def logs(self) -> str:
        """The job's log without the autoscaler's repeated lines: the driver's own lines and the last 6000 chars."""
        full = self.client.get_job_logs(self.submission_id)
        own = [line for line in full.splitlines() if "[driver]" in line or "Error" in line]
        return "\n".join(own[-80:]) + "\n----- tail\n" + full[-6000:]

    def full_logs(self) -> str:
        return self.client.get_job_logs(self.submission_id)

    @property
    def ray_job_id(self) -> str:
        return self.client.get_job_info(self.submission_id).job_id


def _placements(cluster: FakeCluster, job: Job) -> dict[str, list[str]]:
    """Pool of every stage actor, of the collate actor and of every decode task of the job."""
    pools = {node_id: info.pool for node_id, info in cluster.nodes().items()}
    events = job_events(cluster.address, job.ray_job_id)
    placed: dict[str, list[str]] = {}
    for name, cls, node, _ in events["actors"]:
        if name.startswith("mimo/"):
            key = name.split("/")[1]  # encoder-shared, lm
        elif "_CollateFn" in cls:
            key = "collate"
        else:
            continue
        placed.setdefault(key, []).append(pools.get(node, node))
    for name, node, _, resources in events["tasks"]:
        if "decode_batch" in name:
            # A task Ray Data cancelled at the end never ran anywhere: it must still have asked for the pool.
            where = pools.get(node, node) if node else ("cpu_decode" if "cpu_decode" in resources else "anywhere")
            placed.setdefault("decode", []).append(where)
    return placed


def _wait_scaled_down(cluster: FakeCluster, t0: float) -> float:
    """Seconds from ``t0`` until no GPU-pool node is alive (bounded); on time-out the failure shows what the
    autoscaler saw (``ray status -v``: usage and idle time per node) and what still held resources."""
    deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
    while time.monotonic() < deadline:
        alive = cluster.alive_pools()
        if not any(alive.get(p) for p in GPU_POOLS):
            return time.monotonic() - t0
        time.sleep(1)
    pytest.fail(f"GPU pools still up {SCALE_DOWN_TIMEOUT_S} s after the job: {alive}\n{cluster.holders()}")


def _final_loss(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["final_loss"]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(900)  # idle 2-core box: ~2 min; the bounds inside name what was late
def test_pools_scale_for_the_job_and_a_lost_lm_node_is_replaced(tmp_path, synthetic_module, ray_local):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jobs import train as train_job

    data = _make_data(tmp_path / "data", synthetic_module)
    # The uninterrupted reference: the same flags, fused, in this process (no cluster resources to ask for).
    out_ref = tmp_path / "reference"
    train_job.main(["--preset", "tiny", "--max-steps", str(STEPS), "--output-dir", str(out_ref), "--data-path",
                    str(data), "--runtime", "fused", "train.ckpt_interval=0"])  # fmt: skip
    loss_ref = _final_loss(out_ref)
    t_start = time.monotonic()
    with FakeCluster(tmp_path, idle_timeout_minutes=0.1) as cluster:
        t_head = time.monotonic() - t_start
        client = JobSubmissionClient(cluster.address)
        # Submitted with the command line, as a user does: `ray job submit -- python jobs/train.py ...`.
        out = tmp_path / "run"
        job = Job(cluster, client, _entrypoint(data, out))
        metrics = out / "metrics.jsonl"
        status = job.wait(until=lambda: (out / "checkpoints" / "latest").exists() and metrics.exists())
        assert status is None, f"the job ended ({status}) before its first checkpoint:\n{job.logs()}"
        # The autoscaler launched exactly one node of each pool: the decode pool (min_workers 1) and the GPU pools
        # for the pending placement groups (min_workers 0: nothing else would start them).
        seen = cluster.nodes()
        launched = sorted(info.pool for info in seen.values() if info.pool != "head")
        assert launched == ["cpu_decode", "encoder_gpu", "lm_gpu"], dumps(seen)
        lm_nodes_before = {node for name, _, node, _ in job_events(cluster.address, job.ray_job_id)["actors"]
                           if name.startswith("mimo/lm/")}  # fmt: skip
        assert len(lm_nodes_before) == 1 and cluster.nodes()[next(iter(lm_nodes_before))].pool == "lm_gpu"

        # ---- the LM node dies after the first checkpoint; the autoscaler replaces it, recovery finishes the run
        victim = lm_nodes_before.pop()
        t_kill = time.monotonic()
        killed = cluster.kill_node(victim)
        assert killed, f"no process of node {victim} found"
        replaced_s = []

        def replaced() -> bool:
            alive_lm = [n for n, i in cluster.nodes().items() if i.pool == "lm_gpu" and i.alive and n != victim]
            if alive_lm and not replaced_s:
                replaced_s.append(time.monotonic() - t_kill)
            return False

        status = job.wait(until=replaced)
        assert status == JobStatus.SUCCEEDED, job.logs() + cluster.log_tail()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == STEPS and len(summary["failures"]) >= 1, dumps(summary)
        # Waiting for the replacement node is reported, and is no failure: only the lost node's failure counts.
        log = job.full_logs()
        # The job's driver attached to the cluster (RAY_ADDRESS from the job supervisor), not an embedded Ray.
        assert "Connecting to existing Ray cluster" in log and "Started a local Ray instance" not in log
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
        assert (out / "checkpoints" / f"step_{STEPS:07d}" / "COMPLETE").exists()
        # Whether recovery had to wait depends on how soon the autoscaler's new node is up (Ray reschedules the lost
        # bundle at once, so the node may be there before the driver asks again); when it waited, it waited for the
        # lost LM bundle only. The report itself is checked deterministically in test_demand.
        after_failure = log[log.index("rebuilding all groups from latest") :]
        waits = [line for line in after_failure.splitlines() if "[driver] waiting for" in line]
        assert all("[driver] waiting for 2 bundles of pool lm_gpu (lm) (" in line for line in waits), waits
        assert not [f for f in summary["failures"] if "recovery after" in f], dumps(summary)
        seen = cluster.nodes()
        assert seen[victim].alive is False
        lm_after = {n for n, i in seen.items() if i.pool == "lm_gpu"} - {victim}
        assert len(lm_after) >= 1, dumps(seen)  # a new LM node
        placed = _placements(cluster, job)
        assert set(placed["lm"]) == {"lm_gpu"} and len(placed["lm"]) >= 4, dumps(placed)  # 2 ranks, before + after
        assert set(placed["encoder-shared"]) == {"encoder_gpu"}, dumps(placed)
        assert set(placed["collate"]) == {"cpu_decode"}, dumps(placed)
        assert placed["decode"] and set(placed["decode"]) == {"cpu_decode"}, dumps(placed)
        loss = _final_loss(out)
        assert loss == pytest.approx(loss_ref, rel=LOSS_RTOL)
        scale_down_s = _wait_scaled_down(cluster, job.t_end)
        assert cluster.alive_pools().get("cpu_decode") == 1  # min_workers stays
        report = {
            "head_up_s": round(t_head, 1),
            "scale_up_s": {k: round(v, 1) for k, v in job.first_alive.items()},
            "lm_node_replaced_after_kill_s": replaced_s[0] if replaced_s else None,
            "job_wall_s": round(job.t_end - job.t_submit, 1),
            "scale_down_s": round(scale_down_s, 1),
            "final_loss": [loss_ref, loss],
            "failures": summary["failures"],
            "placed": {k: sorted(set(v)) + [len(v)] for k, v in placed.items()},
            "nodes": {n[-5:]: [i.pool, i.alive] for n, i in cluster.nodes().items()},
        }
        print("AUTOSCALING " + json.dumps(report, default=str), flush=True)
    assert cluster.leftover() == []
