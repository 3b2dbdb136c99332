"""Shared fixtures: one Megatron world and (lazily) one local Ray instance per test session; markers.

Device-portable: the suite runs on the CPU unless ``MIMO_RAY_TEST_DEVICE=cuda``. On a CUDA machine CUDA is hidden
(``CUDA_VISIBLE_DEVICES=""``, set before torch first touches CUDA, inherited by Ray workers and subprocesses), so no
test mixes CUDA tensors (e.g. RoPE tables on ``torch.cuda.current_device()``) with CPU ones; the ``gpu``-marked tests
are skipped. With ``MIMO_RAY_TEST_DEVICE=cuda`` only the ``gpu``-marked tests run, all of them on the GPU.
"""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("MIMO_RAY_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"MIMO_RAY_TEST_DEVICE={TEST_DEVICE!r} must be cpu or cuda")
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("MIMO_RAY_TEST_DEVICE=cuda but torch sees no CUDA device")
        skip_cpu = pytest.mark.skip(reason="MIMO_RAY_TEST_DEVICE=cuda runs only the gpu-marked tests")
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(skip_cpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with MIMO_RAY_TEST_DEVICE=cuda)")
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


@pytest.fixture(scope="session")
def synthetic_module():
    """``datasets/make_synthetic.py`` (loaded by :func:`mimo_ray.cli.synthetic.load_synthetic_module`)."""
    from mimo_ray.cli.synthetic import load_synthetic_module

    return load_synthetic_module()
