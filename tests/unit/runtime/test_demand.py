"""Waiting for resources is not a failure (issue 22 item 3): a bounded wait that keeps waiting while the cluster
has requests pending and fails fast on a hang with nothing pending; placement progress lines; demand capped at
what the autoscaler may ever start."""

from __future__ import annotations

import logging
import time

import pytest
import ray

from mimo_ray.config_cli import load_config
from mimo_ray.runtime.demand import get_waiting_for_resources, pending_demand
from mimo_ray.runtime.placement import (
    GroupSpec,
    InsufficientResourcesError,
    check_capacity,
    group_specs,
    release,
    reserve,
    waiting_message,
)


@ray.remote
def _hold(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_step_whose_tasks_wait_for_busy_cpus_waits_on_and_returns(ray_local):
    busy = _hold.options(num_cpus=4).remote(6.0)  # every CPU of the 4-CPU local node, for 6 s
    time.sleep(0.5)
    queued = _hold.options(num_cpus=1).remote(0.0)  # pending until `busy` ends: resource demand, not a hang
    t0 = time.monotonic()
    out = get_waiting_for_resources([busy, queued], step_timeout_s=1.0, resource_wait_s=120.0, what="step 1")
    assert out == [6.0, 0.0]
    assert time.monotonic() - t0 > 1.0  # it outlived step_timeout_s without failing


def test_a_hang_with_nothing_pending_fails_after_the_step_timeout(ray_local):
    ref = _hold.options(num_cpus=0.5).remote(30.0)  # placed and running: nothing waits for resources
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.GetTimeoutError) as err:
        get_waiting_for_resources([ref], step_timeout_s=1.0, resource_wait_s=120.0, what="step 4")
    assert time.monotonic() - t0 < 60
    assert "step 4: 1 of 1 actor results not ready after 1 s" in str(err.value)
    assert "with no resource request pending in the cluster" in str(err.value)
    ray.cancel(ref, force=True)


def test_demand_that_never_arrives_fails_after_the_recovery_timeout_naming_it(ray_local):
    ref = _hold.options(num_cpus=1, resources={"lm_gpu": 1}).remote(0.0)  # no node offers lm_gpu
    deadline = time.monotonic() + 60
    while not any("lm_gpu: 1" in d for d in pending_demand()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "1 x {CPU: 1, lm_gpu: 1} (tasks/actors)" in pending_demand()
    with pytest.raises(ray.exceptions.GetTimeoutError) as err:
        get_waiting_for_resources([ref], step_timeout_s=0.5, resource_wait_s=2.0, what="step 2")
    msg = str(err.value)
    assert msg.startswith("step 2: not done after ") and "{CPU: 1, lm_gpu: 1} (tasks/actors)" in msg
    assert "(train.recovery_timeout_s)" in msg
    ray.cancel(ref, force=True)


def test_placement_wait_reports_what_it_waits_for(ray_local, caplog):
    cfg = load_config("tiny", ["parallel.lm_resources={lm_gpu: 1}", "parallel.lm_tp=2"])
    caplog.set_level(logging.WARNING, logger="mimo_ray")
    logger = logging.getLogger("mimo_ray")
    logger.addHandler(caplog.handler)
    try:
        with pytest.raises(InsufficientResourcesError):
            reserve(group_specs(cfg), timeout_s=3.0, poll_s=0.2, capacity={}, progress_s=1.0)
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "mimo_ray.runtime.placement"]
    assert lines and all(line.startswith("waiting for 2 bundles of pool lm_gpu (lm) (") for line in lines), lines
    assert len(lines) >= 2  # at once, then every progress_s


def test_waiting_message_counts_bundles_per_pool():
    class _PG:
        def __init__(self, n: int) -> None:
            self.bundle_specs = [{"CPU": 1}] * n

    lm = GroupSpec("lm", "lm", 4, 0.25, resources={"lm_gpu": 1}, pack_size=2)
    enc = GroupSpec("encoder-shared", "encoder", 1, 0.25)
    msg = waiting_message([(lm, _PG(2)), (lm, _PG(2)), (enc, _PG(1))])
    assert msg == "waiting for 4 bundles of pool lm_gpu (lm), 1 bundle of pool any node (encoder-shared)"


def test_demand_above_the_autoscalers_most_is_refused_before_any_request(ray_local):
    cfg = load_config("tiny", ["parallel.lm_resources={lm_gpu: 1}", "parallel.lm_dp=2", "parallel.lm_tp=2"])
    specs = group_specs(cfg)
    with pytest.raises(InsufficientResourcesError) as err:
        reserve(specs, timeout_s=30.0, capacity={"CPU": 64.0, "lm_gpu": 2.0})
    msg = str(err.value)
    assert "more than the cluster can ever hold: lm_gpu: 4 (most 2)" in msg and "max_workers" in msg
    table = ray.util.placement_group_table().values()
    assert not [t for t in table if t["name"].startswith("mimo/") and t["state"] != "REMOVED"]
    check_capacity(specs, None)  # no autoscaler config: nothing to check
    check_capacity(specs, {"CPU": 64.0, "lm_gpu": 4.0})
    with pytest.raises(InsufficientResourcesError, match="encoder_gpu: 1 \\(most 0\\)"):
        check_capacity(group_specs(load_config("tiny", ["parallel.encoder_resources={encoder_gpu: 1}"])), {"CPU": 8})
    pgs = reserve(group_specs(load_config("tiny")), timeout_s=30.0, capacity={"CPU": 64.0})
    release(pgs)
