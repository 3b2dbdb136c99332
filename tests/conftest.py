"""Shared fixtures: one Megatron world and (lazily) one local Ray instance per test session; markers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_world():
    """Megatron initialised in the test process: gloo, world 1, TP 1, free port."""
    from mimo_ray.parallel.megatron_setup import init_megatron

    torch.set_num_threads(1)
    return init_megatron(seed=1234)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (4 logical CPUs so stage actors and data tasks both fit)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to another user's `ray start` cluster on this host
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
