"""Decode work asks for the decode pool's resource when the cluster has one (ray_cluster.yaml's cpu_decode)."""

import pytest
import ray

from mimo_ray.config_cli import load_config
from mimo_ray.data.ray_dataset import decode_pool, decode_resources, pool_remote_args


@pytest.mark.parametrize(
    ("setting", "cluster", "pool"),
    [
        ("auto", {"CPU": 4}, None),
        ("auto", {"CPU": 4, "cpu_decode": 2}, "cpu_decode"),
        ("none", {"CPU": 4, "cpu_decode": 2}, None),
        ("decode_node", {"CPU": 4}, "decode_node"),  # named: asked for even before the pool has a node
    ],
)
def test_decode_pool_choice(monkeypatch, setting, cluster, pool):
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    cfg = load_config("tiny", [f"parallel.decode_resource={setting}", "data.num_decode_workers=4"])
    assert decode_pool(cfg) == pool
    assert pool_remote_args(pool, 0.5) == ({"resources": {pool: 0.5}} if pool else {})
    if pool == "cpu_decode":  # the pool's own CPUs are the budget; stage actors live elsewhere
        assert decode_resources(cfg, pool) == (2.0, 0.49)  # 4 tasks and the collate actor's share fit in 2
    if pool == "decode_node":  # no node yet: one slot per decode worker, the autoscaler brings the node
        assert decode_resources(cfg, pool) == (4.0, 0.99)


def test_decode_demand_never_exceeds_what_the_autoscaler_may_start(monkeypatch):
    import mimo_ray.data.ray_dataset as rd

    cfg = load_config("tiny", ["parallel.decode_resource=decode_node", "data.num_decode_workers=8"])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4})  # no pool node yet
    monkeypatch.setattr(rd, "cluster_capacity", lambda: {"CPU": 6.0, "decode_node": 2.0})  # max_workers x 2
    assert decode_resources(cfg, "decode_node") == (2.0, 0.24)  # 8 tasks in 2 slots, never 8 slots
    monkeypatch.setattr(rd, "cluster_capacity", lambda: None)  # no autoscaler config: one slot per worker
    assert decode_resources(cfg, "decode_node") == (8.0, 0.99)


@pytest.mark.parametrize(("slots", "workers"), [(2.0, 2), (2.0, 1), (4.0, 3), (1.0, 4)])
def test_all_decode_tasks_and_the_collate_actor_fit_the_pool_at_once(monkeypatch, slots, workers):
    """ray_cluster.yaml's decode node has 2 slots and 2 decode workers by default: with 1.0 per task and the collate
    actor's 0.01, only one task ran at a time (and a task waiting on another's verdict stalled until its deadline)."""
    import mimo_ray.data.ray_dataset as rd

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "cpu_decode": slots})
    monkeypatch.setattr(rd, "cluster_capacity", lambda: None)
    cfg = load_config("tiny", [f"data.num_decode_workers={workers}"])
    budget, per_task = decode_resources(cfg, "cpu_decode")
    assert budget == slots and workers * per_task + rd.COLLATE_POOL_SHARE <= slots
    assert per_task >= min(1.0, slots / workers) - 0.02


def test_closing_iter_closes_the_generator_ray_data_made(ray_local):
    """A loop that stops early must not leave Ray Data's generator to the garbage collector: finalised after
    ``ray.shutdown()`` it ended a driver script with exit 1 (CI, examples/train_manifest.py)."""
    import inspect

    from mimo_ray.data.ray_dataset import closing_iter

    ds = ray.data.range(40, override_num_blocks=4)
    with closing_iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)) as tables:
        first = next(tables)
        assert inspect.getgeneratorstate(tables) == inspect.GEN_SUSPENDED
    assert inspect.getgeneratorstate(tables) == inspect.GEN_CLOSED
    assert first.num_rows == 10
    with closing_iter(ds.iter_rows()) as rows:  # ``iter_rows`` too; a full pass ends the same way
        assert sum(1 for _ in rows) == 40
    assert inspect.getgeneratorstate(rows) == inspect.GEN_CLOSED


def test_an_early_end_stops_the_executor_without_force_cancelling_running_tasks(ray_local, monkeypatch):
    """Ray Data's own early end force-cancels running tasks, which can abort the driver in Ray 2.60's core worker
    (a cancel racing with the task's reply); ours shuts the executor down gently, and the tasks still end."""
    import time

    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    from mimo_ray.data.ray_dataset import closing_iter, iter_batches_ending_gently

    forces: list[bool] = []
    real = StreamingExecutor.shutdown

    def spy(self, force, exception=None):
        forces.append(force)
        return real(self, force, exception)

    monkeypatch.setattr(StreamingExecutor, "shutdown", spy)

    def slow(batch):
        time.sleep(0.5)
        return batch

    ds = ray.data.range(40, override_num_blocks=8).map_batches(slow, batch_size=None)
    with closing_iter(iter_batches_ending_gently(ds, batch_size=None, prefetch_batches=2)) as gentle:
        assert len(next(gentle)["id"]) == 5  # the other tasks are still running or queued
    assert forces and not any(forces), forces
    forces.clear()
    with closing_iter(ds.iter_batches(batch_size=None, prefetch_batches=2)) as plain:  # what Ray Data itself does
        next(plain)
    assert True in forces, forces
