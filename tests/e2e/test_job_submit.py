"""`ray start --head` + `ray job submit --working-dir .` of jobs/train.py on a real local cluster."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimo_ray.parallel.megatron_setup import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is the one on the head's PATH
    # `ray start` gives the dashboard (the job API) 60 s by default; a starved 2-core box can need more.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_DASHBOARD_STARTUP_TIMEOUT_S="240")
    env.pop("RAY_ADDRESS", None)
    return env


def _wait_http(url: str, timeout_s: float) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard at {url} did not come up in {timeout_s}s")


@pytest.mark.cluster
def test_ray_job_submit_trains_and_checkpoints(tmp_path):
    # Every port is chosen free: a session Ray instance (the `ray_local` fixture) may still hold the defaults,
    # e.g. its dashboard agent on 52365, and a second agent that cannot bind means "No available agent".
    gcs, dash, agent_http, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    temp_dir = Path("/tmp") / f"ray_jobtest_{gcs}"
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "run"
    try:
        _wait_http(address, 90)
        agent_deadline = time.time() + 120
        while True:  # the job agent can come up seconds after the dashboard answers
            submit = subprocess.run(
                [
                    str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                    "python", "jobs/train.py", "--preset", "tiny", "--max-steps", "3", "--output-dir", str(out),
                    "train.ckpt_interval=2",
                ],
                cwd=ROOT,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > agent_deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
        # The job's driver attached to this cluster (RAY_ADDRESS from the job supervisor), not an embedded Ray.
        assert "Connecting to existing Ray cluster" in submit.stdout + submit.stderr
        assert "Started a local Ray instance" not in submit.stdout + submit.stderr
        from ray.job_submission import JobStatus, JobSubmissionClient

        assert JobSubmissionClient(address).get_job_status(job_id) == JobStatus.SUCCEEDED
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
        assert (out / "checkpoints" / "step_0000003" / "COMPLETE").exists()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runtime"] == "disaggregated" and summary["steps"] == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-f", str(temp_dir)], check=False)
